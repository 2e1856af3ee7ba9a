//! One KVM vCPU: boot defaults (CPUID, MSRs, FPU, LAPIC LINTs), KVM_RUN and its exits, and
//! vCPU state save/restore.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_run, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_MSR_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use vmm::hypervisor::{
    ExitHandler, HypervisorError, Result, Vcpu, VcpuExit, VcpuKicker, VcpuState, VcpuX86_64,
    X86Regs, X86Sregs, X86VcpuRegs,
};
use zerocopy::IntoBytes;

use super::convert::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm};
use super::cpuid::{patch_cpuid, CpuTopology};
use super::kick::{install_kick_signal, store_immediate_exit, KvmKicker};
use super::state::{
    blob, check_backend, decode, decode_fpu, decode_msrs, encode, encode_fpu, encode_msrs, invalid,
    BACKEND,
};
use super::{os, HostCaps, KvmVm};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// LAPIC register offsets and LVT delivery modes (bits 10:8).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;

// KVM_RUN, for the I/O-completing run that `save_state` makes with only `&self`.
vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);

const FPU_DEFAULT_FCW: u16 = 0x37f;
const FPU_DEFAULT_MXCSR: u32 = 0x1f80;

/// Size of the legacy `kvm_xsave` area; KVM_GET_XSAVE2 may append to it.
const XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();

const KEY_FPU: &str = "fpu";
const KEY_XSAVE: &str = "xsave";
const KEY_XCRS: &str = "xcrs";
const KEY_MSRS: &str = "msrs";
const KEY_LAPIC: &str = "lapic";
const KEY_EVENTS: &str = "vcpu_events";
const KEY_DEBUGREGS: &str = "debugregs";
const KEY_MP_STATE: &str = "mp_state";

pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// This vCPU's kvm_run page, mapped by `fd` for as long as `fd` lives. A raw pointer
    /// (which also keeps the type !Send, as a vCPU must be) because the kicker writes
    /// `immediate_exit` from other threads while the run loop reads exit data.
    run: *mut kvm_run,
    kicker: Arc<KvmKicker>,
    caps: Arc<HostCaps>,
    xsave2_size: usize,
    has_xsave: bool,
    has_xcrs: bool,
}

impl KvmVcpu {
    /// Creates vCPU `id` of `vm` on the calling thread and sets it up for boot.
    pub fn new(vm: &KvmVm, id: u32) -> Result<KvmVcpu> {
        install_kick_signal()?;
        let mut fd = vm.fd.create_vcpu(u64::from(id)).map_err(os("KVM_CREATE_VCPU"))?;
        let run: *mut kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points into the kvm_run mapping owned by `fd`; the vCPU detaches the
        // kicker in Drop before `fd` (and the mapping) goes away.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: as above; the pointer stays valid until `detach`.
        let kicker = Arc::new(unsafe { KvmKicker::for_current_thread(immediate_exit) });
        let vcpu = KvmVcpu {
            id,
            fd,
            run,
            kicker,
            caps: vm.caps.clone(),
            xsave2_size: vm.xsave2_size,
            has_xsave: vm.has_xsave,
            has_xcrs: vm.has_xcrs,
        };
        vcpu.set_boot_cpuid(vm.vcpu_count)?;
        vcpu.set_boot_msrs()?;
        let fpu = kvm_fpu { fcw: FPU_DEFAULT_FCW, mxcsr: FPU_DEFAULT_MXCSR, ..Default::default() };
        vcpu.fd.set_fpu(&fpu).map_err(os("KVM_SET_FPU"))?;
        vcpu.set_boot_lints()?;
        Ok(vcpu)
    }

    fn set_boot_cpuid(&self, vcpu_count: u32) -> Result<()> {
        let mut entries = self.caps.supported_cpuid.clone();
        patch_cpuid(&mut entries, CpuTopology { apic_id: self.id, vcpu_count });
        let cpuid = CpuId::from_entries(&entries).map_err(|e| HypervisorError::Os {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(os("KVM_SET_CPUID2"))
    }

    fn set_boot_msrs(&self) -> Result<()> {
        let entry = |index, data| kvm_msr_entry { index, reserved: 0, data };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_STAR, 0),
            entry(MSR_CSTAR, 0),
            entry(MSR_KERNEL_GS_BASE, 0),
            entry(MSR_SYSCALL_MASK, 0),
            entry(MSR_LSTAR, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        ];
        let written = self.set_msrs_skipping_refused(&entries)?;
        if written != entries.len() {
            log::warn!("KVM refused {} of the boot MSRs", entries.len() - written);
        }
        Ok(())
    }

    /// LINT0 delivers the PIC's ExtINT, LINT1 the NMI, as firmware leaves them on a PC.
    fn set_boot_lints(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(os("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)]
        {
            let value = lapic_reg(&lapic, offset);
            set_lapic_reg(&mut lapic, offset, (value & !APIC_DELIVERY_MODE_MASK) | mode);
        }
        self.fd.set_lapic(&lapic).map_err(os("KVM_SET_LAPIC"))
    }

    /// Writes `entries`, skipping any KVM refuses; returns how many were written.
    fn set_msrs_skipping_refused(&self, entries: &[kvm_msr_entry]) -> Result<usize> {
        let mut written = 0;
        let mut rest = entries;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let msrs = Msrs::from_entries(chunk).map_err(|e| HypervisorError::Os {
                op: "KVM_SET_MSRS",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")),
            })?;
            let n = self.fd.set_msrs(&msrs).map_err(os("KVM_SET_MSRS"))?.min(chunk.len());
            written += n;
            if n < chunk.len() {
                log::debug!("KVM refused to set MSR {:#x}", chunk[n].index);
                rest = &rest[n + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        Ok(written)
    }

    /// Reads every MSR of KVM's index list that KVM agrees to read.
    fn readable_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        let mut saved = Vec::new();
        let mut rest: &[u32] = &self.caps.msr_indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<_> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| HypervisorError::Os {
                op: "KVM_GET_MSRS",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")),
            })?;
            let n = self.fd.get_msrs(&mut msrs).map_err(os("KVM_GET_MSRS"))?.min(chunk.len());
            saved.extend_from_slice(&msrs.as_slice()[..n]);
            rest = if n < chunk.len() { &rest[n + 1..] } else { &rest[n..] };
        }
        Ok(saved)
    }

    fn xsave_fam_len(&self) -> usize {
        self.xsave2_size.saturating_sub(XSAVE_LEGACY_SIZE).div_ceil(std::mem::size_of::<u32>())
    }

    fn get_xsave_bytes(&self) -> Result<Vec<u8>> {
        if self.xsave2_size > 0 {
            let mut xsave = Xsave::new(self.xsave_fam_len()).map_err(|e| HypervisorError::Os {
                op: "KVM_GET_XSAVE2",
                source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("{e:?}")),
            })?;
            // SAFETY: `xsave` is allocated with the size KVM_CAP_XSAVE2 reported, which is what
            // KVM_GET_XSAVE2 writes; nothing enables XSTATE features in between.
            unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(os("KVM_GET_XSAVE2"))?;
            let mut bytes = xsave.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
            bytes.extend_from_slice(xsave.as_slice().as_bytes());
            Ok(bytes)
        } else {
            let xsave = self.fd.get_xsave().map_err(os("KVM_GET_XSAVE"))?;
            Ok(xsave.region.as_bytes().to_vec())
        }
    }

    /// An XSAVE blob must hold the legacy area and fit this host's XSAVE2 buffer.
    fn check_xsave_len(&self, bytes: &[u8]) -> Result<()> {
        let host_size = self.xsave2_size.max(XSAVE_LEGACY_SIZE);
        if bytes.len() < XSAVE_LEGACY_SIZE || bytes.len() > host_size || bytes.len() % 4 != 0 {
            return Err(invalid(format!(
                "{KEY_XSAVE} blob is {} bytes, expected {XSAVE_LEGACY_SIZE}..={host_size}",
                bytes.len()
            )));
        }
        Ok(())
    }

    fn set_xsave_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.check_xsave_len(bytes)?;
        let (legacy, extra) = bytes.split_at(XSAVE_LEGACY_SIZE);
        if self.xsave2_size > 0 {
            let mut xsave = Xsave::new(self.xsave_fam_len()).map_err(|e| HypervisorError::Os {
                op: "KVM_SET_XSAVE",
                source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("{e:?}")),
            })?;
            // SAFETY: only the region is written, never the FAM length.
            unsafe { xsave.as_mut_fam_struct() }
                .xsave
                .region
                .as_mut_bytes()
                .copy_from_slice(legacy);
            // `extra` fits: its length is at most host_size - 4096, i.e. the FAM's bytes.
            let tail = xsave.as_mut_slice().as_mut_bytes();
            let n = extra.len().min(tail.len());
            tail[..n].copy_from_slice(&extra[..n]);
            // SAFETY: `xsave` has the size KVM_CAP_XSAVE2 reported, all KVM_SET_XSAVE reads.
            unsafe { self.fd.set_xsave2(&xsave) }.map_err(os("KVM_SET_XSAVE"))
        } else {
            let xsave: kvm_xsave = decode(KEY_XSAVE, legacy)?;
            // SAFETY: without KVM_CAP_XSAVE2 the kernel reads exactly sizeof(kvm_xsave).
            unsafe { self.fd.set_xsave(&xsave) }.map_err(os("KVM_SET_XSAVE"))
        }
    }

    /// KVM finishes an I/O or MMIO exit (stores IN data, advances RIP) only on the next
    /// KVM_RUN. Before saving, make that run with `immediate_exit` set, so it completes the
    /// instruction and returns EINTR without running guest code: the state is then between
    /// two instructions. A kick pending before or arriving meanwhile stays pending.
    fn complete_pending_io(&self) -> Result<()> {
        let completion = self.kicker.begin_completion();
        // SAFETY: KVM_RUN on our own vCPU fd takes no argument; the kvm_run page it writes is
        // mapped by `self.fd`, and no reference into it is held across this call.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl(&self.fd, KVM_RUN()) };
        let error = std::io::Error::last_os_error();
        self.kicker.end_completion(completion);
        if rc == 0 {
            // Completing the access asked userspace for more (a long string I/O).
            return Err(HypervisorError::UnexpectedExit(
                "I/O still pending while saving vCPU state; run the vCPU first".to_string(),
            ));
        }
        match error.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(()),
            _ => Err(HypervisorError::Os { op: "KVM_RUN", source: error }),
        }
    }

    /// Reads the io exit's access size and repeat count off the kvm_run page.
    fn io_geometry(run: *mut kvm_run) -> (usize, usize) {
        // SAFETY: called only for KVM_EXIT_IO, so the union holds `io`; the page is mapped
        // while the vCPU lives, and these bytes don't overlap the data area being handled.
        unsafe {
            let io = std::ptr::addr_of!((*run).__bindgen_anon_1.io);
            (
                usize::from(std::ptr::addr_of!((*io).size).read()),
                std::ptr::addr_of!((*io).count).read() as usize,
            )
        }
    }

    fn internal_error(&mut self) -> HypervisorError {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the union holds `internal`.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let words = &internal.data[..(internal.ndata as usize).min(internal.data.len())];
        let detail = if words.is_empty() {
            String::new()
        } else {
            let words: Vec<String> = words.iter().map(|w| format!("{w:#x}")).collect();
            format!(", data [{}]", words.join(", "))
        };
        let rip = self.fd.get_regs().map_or(0, |r| r.rip);
        HypervisorError::EmulationFailure { suberror: internal.suberror, rip, detail }
    }
}

/// Splits string I/O data into its `count` accesses of `size` bytes; odd geometry (which the
/// kernel never reports) falls back to one access over the whole buffer.
fn io_accesses(data: &mut [u8], size: usize, count: usize) -> std::slice::ChunksMut<'_, u8> {
    let size = if size == 0 || size.checked_mul(count) != Some(data.len()) {
        data.len().max(1)
    } else {
        size
    };
    data.chunks_mut(size)
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as libc::c_char;
    }
}

/// What one KVM_RUN produced, with the borrow of the kvm_run page already released.
enum RunOutcome {
    Exit(VcpuExit),
    InternalError,
    Failed(HypervisorError),
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Before `fd` unmaps kvm_run.
        self.kicker.detach();
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit> {
        let run = self.run;
        let outcome = match self.fd.run() {
            Ok(KvmExit::IoIn(port, data)) => {
                let (size, count) = Self::io_geometry(run);
                io_accesses(data, size, count).for_each(|access| handler.pio_read(port, access));
                RunOutcome::Exit(VcpuExit::Io)
            }
            Ok(KvmExit::IoOut(port, data)) => {
                let (size, count) = Self::io_geometry(run);
                let size = if size == 0 || size.checked_mul(count) != Some(data.len()) {
                    data.len().max(1)
                } else {
                    size
                };
                data.chunks(size).for_each(|access| handler.pio_write(port, access));
                RunOutcome::Exit(VcpuExit::Io)
            }
            Ok(KvmExit::MmioRead(addr, data)) => {
                handler.mmio_read(addr, data);
                RunOutcome::Exit(VcpuExit::Io)
            }
            Ok(KvmExit::MmioWrite(addr, data)) => {
                handler.mmio_write(addr, data);
                RunOutcome::Exit(VcpuExit::Io)
            }
            Ok(KvmExit::Hlt) => RunOutcome::Exit(VcpuExit::Halt),
            // A triple fault: a PC resets.
            Ok(KvmExit::Shutdown) => RunOutcome::Exit(VcpuExit::Crash),
            Ok(KvmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                RunOutcome::Exit(VcpuExit::Shutdown)
            }
            Ok(KvmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                RunOutcome::Exit(VcpuExit::Reset)
            }
            Ok(KvmExit::SystemEvent(kind, _)) => RunOutcome::Failed(
                HypervisorError::UnexpectedExit(format!("SystemEvent (type {kind})")),
            ),
            Ok(KvmExit::InternalError) => RunOutcome::InternalError,
            Ok(KvmExit::FailEntry(reason, _)) => {
                RunOutcome::Failed(HypervisorError::FailEntry { reason })
            }
            Ok(KvmExit::Intr) => RunOutcome::Exit(VcpuExit::Interrupted),
            Ok(other) => RunOutcome::Failed(HypervisorError::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                RunOutcome::Exit(VcpuExit::Interrupted)
            }
            Err(e) => RunOutcome::Failed(os("KVM_RUN")(e)),
        };
        match outcome {
            RunOutcome::Exit(VcpuExit::Interrupted) => {
                // SAFETY: `run` is this vCPU's live kvm_run page. A kick landing between the
                // EINTR and this store is covered: this run returns Interrupted anyway.
                unsafe { store_immediate_exit(std::ptr::addr_of_mut!((*run).immediate_exit), 0) };
                Ok(VcpuExit::Interrupted)
            }
            RunOutcome::Exit(exit) => Ok(exit),
            RunOutcome::InternalError => Err(self.internal_error()),
            RunOutcome::Failed(e) => Err(e),
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn save_state(&self) -> Result<VcpuState> {
        self.complete_pending_io()?;
        let mut blobs = BTreeMap::new();
        let fpu = self.fd.get_fpu().map_err(os("KVM_GET_FPU"))?;
        blobs.insert(KEY_FPU.to_string(), encode_fpu(&fpu));
        if self.has_xsave {
            blobs.insert(KEY_XSAVE.to_string(), self.get_xsave_bytes()?);
        }
        if self.has_xcrs {
            let xcrs = self.fd.get_xcrs().map_err(os("KVM_GET_XCRS"))?;
            blobs.insert(KEY_XCRS.to_string(), encode(&xcrs));
        }
        blobs.insert(KEY_MSRS.to_string(), encode_msrs(&self.readable_msrs()?));
        let lapic = self.fd.get_lapic().map_err(os("KVM_GET_LAPIC"))?;
        blobs.insert(KEY_LAPIC.to_string(), encode(&lapic));
        let events = self.fd.get_vcpu_events().map_err(os("KVM_GET_VCPU_EVENTS"))?;
        blobs.insert(KEY_EVENTS.to_string(), encode(&events));
        let debugregs = self.fd.get_debug_regs().map_err(os("KVM_GET_DEBUGREGS"))?;
        blobs.insert(KEY_DEBUGREGS.to_string(), encode(&debugregs));
        let mp_state = self.fd.get_mp_state().map_err(os("KVM_GET_MP_STATE"))?;
        blobs.insert(KEY_MP_STATE.to_string(), encode(&mp_state));
        Ok(VcpuState {
            backend: BACKEND.to_string(),
            regs: X86VcpuRegs { regs: self.regs()?, sregs: self.sregs()? },
            blobs,
        })
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        check_backend(&state.backend)?;
        let blobs = &state.blobs;
        // Decode (and size-check) everything before touching the vCPU.
        let fpu = decode_fpu(KEY_FPU, blob(blobs, KEY_FPU)?)?;
        let xsave = if self.has_xsave { Some(blob(blobs, KEY_XSAVE)?) } else { None };
        if let Some(bytes) = xsave {
            self.check_xsave_len(bytes)?;
        }
        let xcrs: Option<kvm_bindings::kvm_xcrs> =
            if self.has_xcrs { Some(decode(KEY_XCRS, blob(blobs, KEY_XCRS)?)?) } else { None };
        let msrs = decode_msrs(KEY_MSRS, blob(blobs, KEY_MSRS)?)?;
        let lapic: kvm_lapic_state = decode(KEY_LAPIC, blob(blobs, KEY_LAPIC)?)?;
        let events: kvm_bindings::kvm_vcpu_events = decode(KEY_EVENTS, blob(blobs, KEY_EVENTS)?)?;
        let debugregs: kvm_bindings::kvm_debugregs =
            decode(KEY_DEBUGREGS, blob(blobs, KEY_DEBUGREGS)?)?;
        let mp_state: kvm_bindings::kvm_mp_state =
            decode(KEY_MP_STATE, blob(blobs, KEY_MP_STATE)?)?;

        // The order KVM needs: sregs (APIC base) before the LAPIC, MSRs after the LAPIC (TSC
        // deadline), pending events last.
        self.fd.set_mp_state(mp_state).map_err(os("KVM_SET_MP_STATE"))?;
        self.set_regs(&state.regs.regs)?;
        self.set_sregs(&state.regs.sregs)?;
        self.fd.set_fpu(&fpu).map_err(os("KVM_SET_FPU"))?;
        if let Some(bytes) = xsave {
            self.set_xsave_bytes(bytes)?;
        }
        if let Some(xcrs) = xcrs {
            self.fd.set_xcrs(&xcrs).map_err(os("KVM_SET_XCRS"))?;
        }
        self.fd.set_debug_regs(&debugregs).map_err(os("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&lapic).map_err(os("KVM_SET_LAPIC"))?;
        let written = self.set_msrs_skipping_refused(&msrs)?;
        if written != msrs.len() {
            log::warn!("KVM refused {} of {} saved MSRs", msrs.len() - written, msrs.len());
        }
        self.fd.set_vcpu_events(&events).map_err(os("KVM_SET_VCPU_EVENTS"))
    }
}

impl VcpuX86_64 for KvmVcpu {
    fn regs(&self) -> Result<X86Regs> {
        self.fd.get_regs().map(|r| regs_from_kvm(&r)).map_err(os("KVM_GET_REGS"))
    }

    fn set_regs(&mut self, regs: &X86Regs) -> Result<()> {
        self.fd.set_regs(&regs_to_kvm(regs)).map_err(os("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<X86Sregs> {
        self.fd.get_sregs().map(|s| sregs_from_kvm(&s)).map_err(os("KVM_GET_SREGS"))
    }

    fn set_sregs(&mut self, sregs: &X86Sregs) -> Result<()> {
        self.fd.set_sregs(&sregs_to_kvm(sregs)).map_err(os("KVM_SET_SREGS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_io_is_split_into_count_accesses() {
        let mut data = [1u8, 2, 3, 4, 5, 6];
        let accesses: Vec<Vec<u8>> = io_accesses(&mut data, 2, 3).map(|a| a.to_vec()).collect();
        assert_eq!(accesses, vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
    }

    #[test]
    fn inconsistent_io_geometry_is_one_access() {
        let mut data = [1u8, 2, 3];
        assert_eq!(io_accesses(&mut data, 2, 3).count(), 1);
        assert_eq!(io_accesses(&mut data, 0, 3).count(), 1);
        assert_eq!(io_accesses(&mut [], 4, 0).count(), 0);
    }

    #[test]
    fn lapic_register_access_is_little_endian_at_the_offset() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0700);
        assert_eq!(lapic.regs[APIC_LVT_LINT0] as u8, 0x00);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2] as u8, 0x01);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0);
    }
}
