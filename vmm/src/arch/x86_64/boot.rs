//! Direct Linux boot on x86_64: loads a kernel (bzImage or ELF vmlinux), its initrd and command
//! line into guest RAM, writes the boot information the kernel reads (the "zero page" or the
//! PVH `hvm_start_info`, each with an e820 map), and sets up the boot vCPU's registers.
//!
//! ```text
//!  bzImage ─────────────▶ LinuxBoot64: 64-bit entry at load address + 0x200,
//!  ELF without PVH note ─▶              RSI = zero page (boot_params), paging on
//!  ELF with PVH note ────▶ Pvh: 32-bit protected mode, paging off, RBX = hvm_start_info
//! ```
//!
//! The kernel file is untrusted: every header field is checked before it is used, and any
//! problem is a specific [`BootError`], never a panic.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{
    boot_e820_entry, boot_params, screen_info, setup_header, CAN_USE_HEAP,
    E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EI_CLASS, ET_EXEC, PT_LOAD};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{kernel_cache, layout};
use crate::hypervisor::{X86DescriptorTable, X86Regs, X86Segment, X86Sregs};
use crate::memory::GuestMemory;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    LinuxBoot64,
    /// Xen PVH entry: 32-bit protected mode without paging, RBX = `hvm_start_info`.
    Pvh,
}

/// Where the kernel was put and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub protocol: BootProtocol,
    /// Guest-physical address of the first instruction.
    pub entry: u64,
    /// Guest-physical range the kernel occupies or needs while it starts (end exclusive).
    pub kernel_start: u64,
    pub kernel_end: u64,
    /// Where the initrd was loaded: (guest address, size in bytes).
    pub initrd: Option<(u64, u64)>,
}

/// Kind of an e820 / PVH memory map entry (the numbering is shared by both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Could not read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kernel file {path} is empty")]
    EmptyKernel { path: PathBuf },
    #[error("{path} is not a Linux kernel image (neither a bzImage nor an x86_64 ELF vmlinux)")]
    NotAKernel { path: PathBuf },
    #[error("Kernel {path} is a corrupt bzImage: {reason}")]
    CorruptBzImage { path: PathBuf, reason: String },
    #[error(
        "Kernel {path} uses Linux boot protocol {}.{:02}; at least 2.06 is needed",
        version >> 8,
        version & 0xff
    )]
    BootProtocolTooOld { path: PathBuf, version: u16 },
    #[error("Kernel {path} is not a 64-bit x86 kernel")]
    Not64Bit { path: PathBuf },
    #[error("Kernel {path} is a corrupt ELF image: {reason}")]
    CorruptElf { path: PathBuf, reason: String },
    #[error("Could not load kernel {path} into guest memory")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "Kernel needs guest RAM up to {needed:#x} but RAM below the PCI hole ends at \
         {available:#x}; give the guest more memory"
    )]
    KernelTooBig { needed: u64, available: u64 },
    #[error(
        "Initrd {path} ({size} bytes) does not fit in guest RAM: {available} bytes are free \
         between the kernel and {limit:#x}"
    )]
    InitrdTooBig { path: PathBuf, size: u64, available: u64, limit: u64 },
    #[error("Kernel command line is {len} bytes long; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("Kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("Guest RAM size of {mib} MiB is not usable for booting")]
    InvalidRamSize { mib: u64 },
    #[error("Could not write the {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Magic "HdrS" of the bzImage setup header, at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
/// Offset of the setup header in the image and in the zero page.
const SETUP_HEADER_OFFSET: usize = offset_of!(boot_params, hdr);
const SETUP_HEADER_END: usize = SETUP_HEADER_OFFSET + size_of::<setup_header>();
/// The first bytes of the file we look at: the whole setup header and the ELF headers.
const PROBE_LEN: usize = 0x1000;
/// Linux x86's COMMAND_LINE_SIZE: what the kernel keeps when no header says otherwise.
const LINUX_COMMAND_LINE_SIZE: usize = 2048;
/// Loader id "undefined" (we are not one of the registered boot loaders).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// End of the real-mode heap, counted from the real-mode code start, minus 0x200 (boot.rst).
const HEAP_END_PTR: u16 = 0xfe00 - 0x200;
const EM_X86_64: u16 = 62;
const ELFCLASS64: u8 = 2;
const PAGE_SIZE: u64 = 0x1000;
/// Physical address where an x86_64 Linux kernel runs by default (CONFIG_PHYSICAL_START).
const DEFAULT_KERNEL_RUNTIME_START: u64 = 0x100_0000;

/// Layout of the PVH information block at `layout::PVH_INFO_START`.
const PVH_MODLIST_OFFSET: u64 = 0x40;
const PVH_MEMMAP_OFFSET: u64 = 0x80;

/// The guest's physical memory map for `ram_size` bytes of RAM.
///
/// RAM below the EBDA, the EBDA/BIOS area (where the ACPI tables live) reserved, RAM from 1 MiB
/// to the PCI hole, the ECAM reserved (so Linux trusts MMCONFIG), RAM above 4 GiB.
pub fn e820_entries(ram_size: u64) -> Vec<E820Entry> {
    let mut entries = Vec::new();
    let mut push = |addr: u64, end: u64, kind: E820Kind| {
        if end > addr {
            entries.push(E820Entry { addr, size: end - addr, kind });
        }
    };
    let low_end = ram_size.min(layout::MMIO_HOLE_START);
    push(0, layout::EBDA_START.min(low_end), E820Kind::Ram);
    push(layout::EBDA_START, layout::KERNEL_START, E820Kind::Reserved);
    push(layout::KERNEL_START, low_end, E820Kind::Ram);
    push(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE,
        E820Kind::Reserved,
    );
    if ram_size > layout::MMIO_HOLE_START {
        let high = ram_size - layout::MMIO_HOLE_START;
        push(layout::HIGH_RAM_START, layout::HIGH_RAM_START.saturating_add(high), E820Kind::Ram);
    }
    entries
}

/// What the header probe found in the kernel file.
enum ImageKind {
    BzImage(BzImageInfo),
    Elf,
}

/// The checked facts of a bzImage setup header that the loader needs.
struct BzImageInfo {
    /// The setup header bytes as the file declares them (0x1f1 up to the header's own end).
    header_bytes: Vec<u8>,
    cmdline_max: usize,
    initrd_addr_max: u64,
    /// Guest-physical range the decompressing kernel needs (its runtime address + init_size).
    runtime_end: u64,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

/// Offset of a setup header field within the image (and the zero page).
macro_rules! hdr_off {
    ($field:ident) => {
        SETUP_HEADER_OFFSET + offset_of!(setup_header, $field)
    };
}

/// Checks a bzImage's setup header against the boot protocol (Documentation/x86/boot.rst).
/// `probe` holds the file's first bytes (up to `PROBE_LEN`), `file_len` its full size.
fn check_bzimage(
    path: &Path,
    probe: &[u8],
    file_len: u64,
    low_ram_end: u64,
) -> Result<BzImageInfo, BootError> {
    let corrupt = |reason: String| BootError::CorruptBzImage { path: path.to_path_buf(), reason };
    if probe.len() < SETUP_HEADER_END {
        return Err(corrupt(format!("truncated setup header ({file_len} bytes)")));
    }
    let version = le16(probe, hdr_off!(version));
    if version < MIN_BOOT_PROTOCOL {
        return Err(BootError::BootProtocolTooOld { path: path.to_path_buf(), version });
    }
    if le16(probe, hdr_off!(boot_flag)) != BOOT_FLAG_MAGIC {
        return Err(corrupt("missing boot flag 0xAA55".into()));
    }
    if probe[hdr_off!(loadflags)] & LOADED_HIGH == 0 {
        return Err(corrupt("a zImage (loaded low) is not supported".into()));
    }
    // The byte after the jump instruction gives the header's length (boot.rst: 0x202 + it).
    let header_end = (offset_of!(setup_header, header) + SETUP_HEADER_OFFSET)
        + usize::from(probe[hdr_off!(jump) + 1]);
    // The header must hold every field its protocol version defines that we read below.
    let needed_end =
        if version >= 0x020a { hdr_off!(init_size) + 4 } else { hdr_off!(cmdline_size) + 4 };
    if header_end < needed_end {
        return Err(corrupt(format!(
            "setup header ends at {header_end:#x}, too short for its protocol version"
        )));
    }
    let setup_sects = match probe[hdr_off!(setup_sects)] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if (header_end as u64) > setup_size {
        return Err(corrupt(format!(
            "setup header ends at {header_end:#x}, beyond the {setup_size:#x}-byte setup"
        )));
    }
    let payload_len = file_len.checked_sub(setup_size).filter(|&len| len > 0).ok_or_else(|| {
        corrupt(format!("truncated: {file_len} bytes, but the setup alone is {setup_size}"))
    })?;
    let syssize = u64::from(le32(probe, hdr_off!(syssize))) * 16;
    if payload_len < syssize {
        return Err(corrupt(format!(
            "truncated: the kernel declares {syssize} bytes of payload, the file has {payload_len}"
        )));
    }
    // XLF_KERNEL_64 exists since protocol 2.12; older 64-bit kernels have the entry anyway.
    if version >= 0x020c && le16(probe, hdr_off!(xloadflags)) & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit { path: path.to_path_buf() });
    }
    // Where the kernel decompresses itself to and how much room it needs there (2.10+).
    let (runtime_start, init_size) = if version >= 0x020a {
        let pref = le64(probe, hdr_off!(pref_address));
        (pref.max(layout::KERNEL_START), u64::from(le32(probe, hdr_off!(init_size))))
    } else {
        (DEFAULT_KERNEL_RUNTIME_START, 0)
    };
    let loaded_end = layout::KERNEL_START + payload_len;
    let runtime_end = runtime_start.saturating_add(init_size).max(loaded_end);
    if runtime_end > low_ram_end {
        return Err(BootError::KernelTooBig { needed: runtime_end, available: low_ram_end });
    }
    let cmdline_max =
        (le32(probe, hdr_off!(cmdline_size)) as usize).min(layout::CMDLINE_MAX_SIZE - 1);
    let initrd_addr_max = u64::from(le32(probe, hdr_off!(initrd_addr_max)));
    let header_bytes = probe[SETUP_HEADER_OFFSET..header_end.min(SETUP_HEADER_END)].to_vec();
    Ok(BzImageInfo { header_bytes, cmdline_max, initrd_addr_max, runtime_end })
}

/// The checked facts of an ELF kernel.
struct ElfInfo {
    entry: u64,
    /// End of the highest loadable segment (in memory, so including its bss).
    end: u64,
}

/// Checks an ELF kernel's headers: an x86_64 executable whose segments lie in low RAM above
/// the boot structures.
fn check_elf(
    path: &Path,
    probe: &[u8],
    file: &mut File,
    low_ram_end: u64,
) -> Result<ElfInfo, BootError> {
    let corrupt =
        |reason: &str| BootError::CorruptElf { path: path.to_path_buf(), reason: reason.into() };
    let mut ehdr = Elf64_Ehdr::default();
    if probe.len() < size_of::<Elf64_Ehdr>() {
        return Err(corrupt("truncated ELF header"));
    }
    ehdr.as_mut_slice().copy_from_slice(&probe[..size_of::<Elf64_Ehdr>()]);
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_machine != EM_X86_64 {
        return Err(BootError::Not64Bit { path: path.to_path_buf() });
    }
    if ehdr.e_type != ET_EXEC {
        return Err(BootError::NotAKernel { path: path.to_path_buf() });
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() || ehdr.e_phnum == 0 {
        return Err(corrupt("bad program header table"));
    }
    file.seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(|_| corrupt("program header table out of the file"))?;
    let mut table = vec![0u8; usize::from(ehdr.e_phnum) * size_of::<Elf64_Phdr>()];
    file.read_exact(&mut table).map_err(|_| corrupt("truncated program header table"))?;
    let mut end = 0u64;
    for raw in table.chunks_exact(size_of::<Elf64_Phdr>()) {
        let mut phdr = Elf64_Phdr::default();
        phdr.as_mut_slice().copy_from_slice(raw);
        if phdr.p_type != PT_LOAD {
            continue;
        }
        if phdr.p_filesz > phdr.p_memsz {
            return Err(corrupt("segment larger in the file than in memory"));
        }
        let seg_end = phdr
            .p_paddr
            .checked_add(phdr.p_memsz)
            .ok_or_else(|| corrupt("segment address overflows"))?;
        if phdr.p_paddr < layout::KERNEL_START {
            return Err(corrupt("segment below 1 MiB would overwrite the boot structures"));
        }
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(corrupt("no loadable segment"));
    }
    if end > low_ram_end {
        return Err(BootError::KernelTooBig { needed: end, available: low_ram_end });
    }
    if !(layout::KERNEL_START..end).contains(&ehdr.e_entry) {
        return Err(corrupt("entry point outside the loaded segments"));
    }
    Ok(ElfInfo { entry: ehdr.e_entry, end })
}

/// Reads the first bytes of `file` (fewer if it is shorter).
fn read_probe(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut probe = Vec::with_capacity(PROBE_LEN);
    file.take(PROBE_LEN as u64).read_to_end(&mut probe)?;
    Ok(probe)
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::GuestMemory { what, source }
}

/// What to boot: the kernel and everything the loader tells it.
#[derive(Debug, Clone, Copy)]
pub struct KernelBoot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub ram_mib: u64,
    /// The RSDP's guest address (0: none, the kernel scans for it).
    pub acpi_rsdp: u64,
    /// A directory: a bzImage is booted from its cached decompressed ELF when that works (see
    /// [`kernel_cache`]), and as itself otherwise.
    pub kernel_cache: Option<&'a Path>,
    /// A linear framebuffer to describe in the zero page. PVH's start info has no place for
    /// one, so with a framebuffer an ELF kernel is entered through startup_64 instead.
    pub framebuffer: Option<BootFramebufferInfo>,
}

/// A 32-bit XRGB8888 linear framebuffer, as VESA firmware would leave it (`screen_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootFramebufferInfo {
    /// Guest-physical address, below 4 GiB.
    pub base: u32,
    /// Bytes reserved for it (a multiple of 64 KiB).
    pub size: u32,
    pub width: u16,
    pub height: u16,
    /// Bytes per row.
    pub stride: u16,
}

/// Loads the kernel, initrd and command line and writes the boot information for the kernel's
/// entry protocol.
pub fn load_kernel(memory: &GuestMemory, boot: &KernelBoot<'_>) -> Result<KernelEntry, BootError> {
    let &KernelBoot { kernel, initrd, cmdline, ram_mib, acpi_rsdp, kernel_cache, framebuffer } =
        boot;
    let ram_size = ram_mib
        .checked_mul(1 << 20)
        .filter(|&size| size > layout::KERNEL_START)
        .ok_or(BootError::InvalidRamSize { mib: ram_mib })?;
    let target = BootTarget { initrd, cmdline, ram_size, acpi_rsdp, framebuffer };
    let low_ram_end = ram_size.min(layout::MMIO_HOLE_START);
    let read_err = |source| BootError::Read { what: "kernel", path: kernel.to_path_buf(), source };
    let mut file = File::open(kernel).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    let probe = read_probe(&mut file).map_err(read_err)?;
    if probe.is_empty() {
        return Err(BootError::EmptyKernel { path: kernel.to_path_buf() });
    }
    let kind = if probe.starts_with(b"\x7fELF") {
        ImageKind::Elf
    } else if probe.len() >= hdr_off!(header) + 4 && le32(&probe, hdr_off!(header)) == HDRS_MAGIC {
        ImageKind::BzImage(check_bzimage(kernel, &probe, file_len, low_ram_end)?)
    } else {
        return Err(BootError::NotAKernel { path: kernel.to_path_buf() });
    };
    let load_err = |source| BootError::Load { path: kernel.to_path_buf(), source };

    match kind {
        ImageKind::BzImage(info) => {
            let max = info.cmdline_max;
            // Checked first so that a too long command line fails the same with the cache.
            check_cmdline(cmdline, max)?;
            if let Some(dir) = kernel_cache {
                if let Some(entry) = load_cached(memory, dir, &mut file, &target) {
                    return Ok(entry);
                }
            }
            file.seek(SeekFrom::Start(0)).map_err(read_err)?;
            let loaded =
                BzImage::load(memory, Some(GuestAddress(layout::KERNEL_START)), &mut file, None)
                    .map_err(load_err)?;
            let initrd_limit = info.initrd_addr_max.saturating_add(1).min(low_ram_end);
            let initrd = load_initrd(memory, initrd, info.runtime_end, initrd_limit)?;
            write_cmdline(memory, cmdline)?;
            let mut params = boot_params::default();
            params.as_mut_slice()
                [SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + info.header_bytes.len()]
                .copy_from_slice(&info.header_bytes);
            params.hdr.code32_start = layout::KERNEL_START as u32;
            params.hdr.loadflags |= CAN_USE_HEAP;
            params.hdr.heap_end_ptr = HEAP_END_PTR;
            write_zero_page(memory, params, initrd, &target)?;
            Ok(KernelEntry {
                protocol: BootProtocol::LinuxBoot64,
                // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
                entry: loaded.kernel_load.0 + 0x200,
                kernel_start: loaded.kernel_load.0,
                kernel_end: info.runtime_end,
                initrd,
            })
        }
        ImageKind::Elf => load_elf(memory, kernel, &mut file, &probe, &target),
    }
}

/// What the kernel is booted with, besides the kernel itself.
struct BootTarget<'a> {
    initrd: Option<&'a Path>,
    cmdline: &'a str,
    ram_size: u64,
    acpi_rsdp: u64,
    framebuffer: Option<BootFramebufferInfo>,
}

/// Boots the bzImage `file` from the kernel cache in `dir` through the PVH entry. `None` (with
/// a warning logged) whenever that does not work out: the caller then boots the bzImage.
fn load_cached(
    memory: &GuestMemory,
    dir: &Path,
    file: &mut File,
    target: &BootTarget,
) -> Option<KernelEntry> {
    let started = std::time::Instant::now();
    let mut cached = match kernel_cache::lookup_or_insert(dir, file) {
        Ok(cached) => cached,
        Err(e) => {
            log::warn!("kernel cache: {}; booting the bzImage itself", crate::error_chain(&e));
            return None;
        }
    };
    let looked_up = started.elapsed();
    let result = cached
        .file
        .seek(SeekFrom::Start(0))
        .and_then(|_| read_probe(&mut cached.file))
        .map_err(|source| BootError::Read { what: "kernel", path: cached.path.clone(), source })
        .and_then(|probe| load_elf(memory, &cached.path, &mut cached.file, &probe, target));
    match result {
        Ok(entry) if entry.protocol == BootProtocol::Pvh || target.framebuffer.is_some() => {
            log::info!(
                "kernel cache: {} {} (lookup {} ms, load {} ms)",
                if cached.hit { "hit" } else { "miss, stored" },
                cached.path.display(),
                looked_up.as_millis(),
                (started.elapsed() - looked_up).as_millis()
            );
            Some(entry)
        }
        Ok(_) => {
            log::warn!(
                "kernel cache: {} has no PVH entry; booting the bzImage itself",
                cached.path.display()
            );
            None
        }
        Err(e) => {
            log::warn!(
                "kernel cache: cannot boot {}: {}; booting the bzImage itself",
                cached.path.display(),
                crate::error_chain(&e)
            );
            None
        }
    }
}

/// Loads an ELF vmlinux (`probe`: its first bytes) and enters it through its PVH note, or
/// through startup_64 with a zero page when it has none.
fn load_elf(
    memory: &GuestMemory,
    kernel: &Path,
    file: &mut File,
    probe: &[u8],
    target: &BootTarget,
) -> Result<KernelEntry, BootError> {
    let &BootTarget { initrd, cmdline, ram_size, acpi_rsdp, framebuffer } = target;
    let low_ram_end = ram_size.min(layout::MMIO_HOLE_START);
    let load_err = |source| BootError::Load { path: kernel.to_path_buf(), source };
    let ElfInfo { entry, end } = check_elf(kernel, probe, file, low_ram_end)?;
    check_cmdline(cmdline, LINUX_COMMAND_LINE_SIZE - 1)?;
    let loaded = Elf::load(memory, None, file, None).map_err(load_err)?;
    let initrd = load_initrd(memory, initrd, end, low_ram_end)?;
    write_cmdline(memory, cmdline)?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(pvh_entry) if framebuffer.is_none() => {
            if !(layout::KERNEL_START..end).contains(&pvh_entry.0) {
                return Err(BootError::CorruptElf {
                    path: kernel.to_path_buf(),
                    reason: "PVH entry point outside the loaded segments".into(),
                });
            }
            write_pvh_info(memory, initrd, ram_size, acpi_rsdp)?;
            Ok(KernelEntry {
                protocol: BootProtocol::Pvh,
                entry: pvh_entry.0,
                kernel_start: layout::KERNEL_START,
                kernel_end: end,
                initrd,
            })
        }
        _ => {
            // No PVH note (or a framebuffer to describe): enter vmlinux's startup_64 with a
            // zero page (as Firecracker does); the header fields below are what it reads.
            let mut params = boot_params::default();
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_RUNTIME_START as u32;
            params.hdr.cmdline_size = (LINUX_COMMAND_LINE_SIZE - 1) as u32;
            write_zero_page(memory, params, initrd, target)?;
            Ok(KernelEntry {
                protocol: BootProtocol::LinuxBoot64,
                entry,
                kernel_start: layout::KERNEL_START,
                kernel_end: end,
                initrd,
            })
        }
    }
}

fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineHasNul);
    }
    let max = max.min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    Ok(())
}

/// Copies the (already checked) command line with its terminating NUL.
fn write_cmdline(memory: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(mem_err("kernel command line"))
}

/// Loads the initrd page-aligned just below `limit`, above `kernel_end`.
fn load_initrd(
    memory: &GuestMemory,
    initrd: Option<&Path>,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = initrd else { return Ok(None) };
    let read_err = |source| BootError::Read { what: "initrd", path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = limit.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1)).filter(|&a| a >= floor);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            available: limit.saturating_sub(floor),
            limit,
        });
    };
    let count = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        available: limit.saturating_sub(floor),
        limit,
    })?;
    memory.read_exact_volatile_from(GuestAddress(addr), &mut file, count).map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(source) => read_err(source),
        other => BootError::GuestMemory { what: "initrd", source: other },
    })?;
    Ok(Some((addr, size)))
}

/// Fills in the loader-owned zero page fields and writes it to `layout::ZERO_PAGE_START`.
fn write_zero_page(
    memory: &GuestMemory,
    mut params: boot_params,
    initrd: Option<(u64, u64)>,
    target: &BootTarget,
) -> Result<(), BootError> {
    let &BootTarget { ram_size, acpi_rsdp, framebuffer, .. } = target;
    if let Some(fb) = framebuffer {
        params.screen_info = screen_info_for(fb);
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    if let Some((addr, size)) = initrd {
        // Both fit in 32 bits: the initrd lies below the PCI hole.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = acpi_rsdp;
    let entries = e820_entries(ram_size);
    // At most five entries: far below the zero page's 128.
    debug_assert!(entries.len() <= E820_MAX_ENTRIES_ZEROPAGE);
    for (slot, e) in params.e820_table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = entries.len() as u8;
    memory.write_obj(params, GuestAddress(layout::ZERO_PAGE_START)).map_err(mem_err("zero page"))
}

/// `screen_info` for a VESA linear framebuffer (VIDEO_TYPE_VLFB): Linux's vesafb drives it
/// and fbcon draws the console on it, with no driver module.
fn screen_info_for(fb: BootFramebufferInfo) -> screen_info {
    const VIDEO_TYPE_VLFB: u8 = 0x23;
    // Without this capability vesafb assumes VGA-compatible hardware and pokes VGA ports.
    const VIDEO_CAPABILITY_64BIT_BASE: u32 = 1 << 1;
    screen_info {
        orig_video_isVGA: VIDEO_TYPE_VLFB,
        lfb_width: fb.width,
        lfb_height: fb.height,
        lfb_depth: 32,
        lfb_base: fb.base,
        // In 64 KiB units for VESA.
        lfb_size: fb.size >> 16,
        lfb_linelength: fb.stride,
        red_size: 8,
        red_pos: 16,
        green_size: 8,
        green_pos: 8,
        blue_size: 8,
        blue_pos: 0,
        rsvd_size: 8,
        rsvd_pos: 24,
        pages: 1,
        capabilities: VIDEO_CAPABILITY_64BIT_BASE,
        ..screen_info::default()
    }
}

/// Writes `hvm_start_info` (version 1, with memory map) and the initrd module entry.
fn write_pvh_info(
    memory: &GuestMemory,
    initrd: Option<(u64, u64)>,
    ram_size: u64,
    acpi_rsdp: u64,
) -> Result<(), BootError> {
    let base = layout::PVH_INFO_START;
    let entries = e820_entries(ram_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: acpi_rsdp,
        memmap_paddr: base + PVH_MEMMAP_OFFSET,
        memmap_entries: entries.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = base + PVH_MODLIST_OFFSET;
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        memory
            .write_obj(module, GuestAddress(info.modlist_paddr))
            .map_err(mem_err("PVH module list"))?;
    }
    for (i, e) in entries.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let addr = info.memmap_paddr + (i * size_of::<hvm_memmap_table_entry>()) as u64;
        memory.write_obj(entry, GuestAddress(addr)).map_err(mem_err("PVH memory map"))?;
    }
    memory.write_obj(info, GuestAddress(base)).map_err(mem_err("PVH start info"))
}

/// Encodes a GDT descriptor from its flags (access byte in bits 0..8, G/DB/L/AVL in bits
/// 12..16), base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The segment register state the CPU would cache after loading GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> X86Segment {
    let bit = |n: u32| (entry >> n) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    let present = bit(47);
    X86Segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: !present,
    }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// IA32_APIC_BASE at reset for the bootstrap processor: enabled, BSP, default address.
const APIC_BASE_BSP: u64 = layout::LAPIC_START | (1 << 11) | (1 << 8);
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_PS: u64 = 0x80;

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page tables, and returns
/// the boot vCPU's registers for `entry`'s protocol.
pub fn setup_boot_cpu(
    memory: &GuestMemory,
    entry: &KernelEntry,
) -> Result<(X86Regs, X86Sregs), BootError> {
    let gdt = match entry.protocol {
        BootProtocol::LinuxBoot64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
        ],
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xfffff), // flat data
            gdt_entry(0x008b, 0, 0x67),    // 32-bit TSS (busy), as the PVH ABI asks
        ],
    };
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    memory.write_slice(&gdt_bytes, GuestAddress(layout::GDT_START)).map_err(mem_err("GDT"))?;
    memory.write_obj(0u64, GuestAddress(layout::IDT_START)).map_err(mem_err("IDT"))?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let mut sregs = X86Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment_from_gdt(gdt[3], 3),
        // The reset state: an empty, usable LDT (VMX entry checks want a valid one).
        ldt: X86Segment { limit: 0xffff, type_: 2, present: true, ..Default::default() },
        gdt: X86DescriptorTable { base: layout::GDT_START, limit: (gdt_bytes.len() - 1) as u16 },
        idt: X86DescriptorTable { base: layout::IDT_START, limit: 7 },
        apic_base: APIC_BASE_BSP,
        ..Default::default()
    };
    let mut regs = X86Regs { rip: entry.entry, rflags: 0x2, ..Default::default() };
    match entry.protocol {
        BootProtocol::LinuxBoot64 => {
            write_identity_page_tables(memory)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            regs.rbx = layout::PVH_INFO_START;
        }
    }
    Ok((regs, sregs))
}

/// Identity-maps the first 1 GiB with 2 MiB pages (all the 64-bit entry needs: kernel, zero
/// page, command line, boot stack).
fn write_identity_page_tables(memory: &GuestMemory) -> Result<(), BootError> {
    memory
        .write_obj(layout::PDPTE_START | PAGE_PRESENT_RW, GuestAddress(layout::PML4_START))
        .map_err(mem_err("page tables"))?;
    memory
        .write_obj(layout::PDE_START | PAGE_PRESENT_RW, GuestAddress(layout::PDPTE_START))
        .map_err(mem_err("page tables"))?;
    let pde: Vec<u8> =
        (0..512u64).flat_map(|i| ((i << 21) | PAGE_PRESENT_RW | PAGE_PS).to_le_bytes()).collect();
    memory.write_slice(&pde, GuestAddress(layout::PDE_START)).map_err(mem_err("page tables"))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;
    use crate::memory::create_guest_memory;

    pub(crate) const RAM_MIB: u64 = 64;
    const PAYLOAD_LEN: usize = 0x2000;
    const ENTRY_RAW: u64 = 0x10_0040;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write temp file");
        f
    }

    fn put16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A minimal bzImage: one setup sector after the boot sector, protocol 2.15, a payload
    /// of `PAYLOAD_LEN` bytes filled with 0xAB.
    pub(crate) fn synthetic_bzimage() -> Vec<u8> {
        let setup_size = 2 * 512;
        let mut img = vec![0u8; setup_size + PAYLOAD_LEN];
        img[hdr_off!(setup_sects)] = 1;
        put32(&mut img, hdr_off!(syssize), (PAYLOAD_LEN / 16) as u32);
        put16(&mut img, hdr_off!(boot_flag), BOOT_FLAG_MAGIC);
        img[hdr_off!(jump)] = 0xeb;
        img[hdr_off!(jump) + 1] = (SETUP_HEADER_END - 0x202) as u8;
        put32(&mut img, hdr_off!(header), HDRS_MAGIC);
        put16(&mut img, hdr_off!(version), 0x020f);
        img[hdr_off!(loadflags)] = LOADED_HIGH;
        put32(&mut img, hdr_off!(code32_start), 0x10_0000);
        put32(&mut img, hdr_off!(initrd_addr_max), 0x37ff_ffff);
        put32(&mut img, hdr_off!(kernel_alignment), 0x20_0000);
        img[hdr_off!(relocatable_kernel)] = 1;
        put16(&mut img, hdr_off!(xloadflags), XLF_KERNEL_64);
        put32(&mut img, hdr_off!(cmdline_size), 2047);
        put64(&mut img, hdr_off!(pref_address), 0x100_0000);
        put32(&mut img, hdr_off!(init_size), 0x20_0000);
        img[setup_size..].fill(0xab);
        img
    }

    /// A minimal x86_64 vmlinux: one PT_LOAD at 1 MiB and, if `pvh`, a PT_NOTE with the Xen
    /// PHYS32_ENTRY note pointing at `ENTRY_RAW + 0x10`.
    pub(crate) fn synthetic_elf(pvh: bool) -> Vec<u8> {
        let ehdr_len = size_of::<Elf64_Ehdr>();
        let phdr_len = size_of::<Elf64_Phdr>();
        let note_off = ehdr_len + 2 * phdr_len;
        let load_off = 0x1000;
        let mut img = vec![0u8; load_off + 0x1000];
        img[..4].copy_from_slice(b"\x7fELF");
        img[EI_CLASS] = ELFCLASS64;
        img[5] = 1; // little-endian
        img[6] = 1;
        put16(&mut img, offset_of!(Elf64_Ehdr, e_type), ET_EXEC);
        put16(&mut img, offset_of!(Elf64_Ehdr, e_machine), EM_X86_64);
        put64(&mut img, offset_of!(Elf64_Ehdr, e_entry), ENTRY_RAW);
        put64(&mut img, offset_of!(Elf64_Ehdr, e_phoff), ehdr_len as u64);
        put16(&mut img, offset_of!(Elf64_Ehdr, e_phentsize), phdr_len as u16);
        put16(&mut img, offset_of!(Elf64_Ehdr, e_phnum), 2);
        let ph = ehdr_len;
        put32(&mut img, ph + offset_of!(Elf64_Phdr, p_type), PT_LOAD);
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_offset), load_off as u64);
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_paddr), 0x10_0000);
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_filesz), 0x1000);
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_memsz), 0x3000);
        let ph = ehdr_len + phdr_len;
        // A note segment without the PVH note is just an unrelated note.
        let note_type: u32 = if pvh { 18 } else { 1 };
        put32(&mut img, ph + offset_of!(Elf64_Phdr, p_type), 4); // PT_NOTE
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_offset), note_off as u64);
        put64(&mut img, ph + offset_of!(Elf64_Phdr, p_filesz), 20);
        put32(&mut img, note_off, 4); // namesz
        put32(&mut img, note_off + 4, 4); // descsz
        put32(&mut img, note_off + 8, note_type);
        img[note_off + 12..note_off + 16].copy_from_slice(b"Xen\0");
        put32(&mut img, note_off + 16, ENTRY_RAW as u32 + 0x10);
        img[load_off..].fill(0xcd);
        img
    }

    fn load(
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> (GuestMemory, Result<KernelEntry, BootError>) {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let kernel = file_with(kernel);
        let initrd = initrd.map(file_with);
        let result = load_kernel(
            &memory,
            &KernelBoot {
                initrd: initrd.as_ref().map(|f| f.path()),
                cmdline,
                acpi_rsdp: layout::ACPI_START,
                ..boot_of(kernel.path())
            },
        );
        (memory, result)
    }

    /// `kernel` with no initrd, no command line, no ACPI, no cache, no framebuffer.
    pub(crate) fn boot_of(kernel: &Path) -> KernelBoot<'_> {
        KernelBoot {
            kernel,
            initrd: None,
            cmdline: "",
            ram_mib: RAM_MIB,
            acpi_rsdp: 0,
            kernel_cache: None,
            framebuffer: None,
        }
    }

    fn read_u64(memory: &GuestMemory, addr: u64) -> u64 {
        memory.read_obj(GuestAddress(addr)).expect("read guest memory")
    }

    #[test]
    fn e820_for_small_ram_has_low_ram_bios_hole_and_ecam() {
        let map = e820_entries(512 << 20);
        let expected = [
            (0, layout::EBDA_START, E820Kind::Ram),
            (layout::EBDA_START, 0x10_0000 - layout::EBDA_START, E820Kind::Reserved),
            (0x10_0000, (512 << 20) - 0x10_0000, E820Kind::Ram),
            (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820Kind::Reserved),
        ];
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn e820_for_large_ram_stops_at_the_hole_and_resumes_above_4g() {
        let ram = 6u64 << 30;
        let map = e820_entries(ram);
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got[2], (0x10_0000, layout::MMIO_HOLE_START - 0x10_0000, E820Kind::Ram));
        assert_eq!(got[3], (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820Kind::Reserved));
        assert_eq!(got[4], (1 << 32, ram - layout::MMIO_HOLE_START, E820Kind::Ram));
        assert_eq!(got.len(), 5);
        // Reserved ranges cover the ACPI tables.
        assert!(map.iter().any(|e| e.kind == E820Kind::Reserved
            && e.addr <= layout::ACPI_START
            && layout::ACPI_START + layout::ACPI_SIZE <= e.addr + e.size));
    }

    #[test]
    fn gdt_entries_encode_the_well_known_flat_descriptors() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 0x120a_9334_5678_bcde);
    }

    #[test]
    fn gdt_entries_decode_to_segment_registers() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.type_, code.limit), (8, 0xb, 0xffff_ffff));
        assert!(code.l && !code.db && code.g && code.s && code.present && !code.unusable);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_), (16, 3));
        assert!(!data.l && data.db);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.type_, tss.limit, tss.s, tss.g), (0xb, 0x67, false, false));
        let null = segment_from_gdt(0, 0);
        assert!(null.unusable);
        let based = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 5);
        assert_eq!((based.base, based.limit), (0x1234_5678, 0xabcde));
    }

    #[test]
    fn linux64_entry_gets_long_mode_with_identity_paging() {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let entry = KernelEntry {
            protocol: BootProtocol::LinuxBoot64,
            entry: 0x10_0200,
            kernel_start: 0x10_0000,
            kernel_end: 0x20_0000,
            initrd: None,
        };
        let (regs, sregs) = setup_boot_cpu(&memory, &entry).expect("setup");
        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!((regs.rsp, regs.rbp), (layout::BOOT_STACK_POINTER, layout::BOOT_STACK_POINTER));
        assert_eq!(regs.rflags, 2);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert!(sregs.cs.l && sregs.cs.selector == 8);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!((seg.selector, seg.type_, seg.present), (16, 3, true));
        }
        assert_eq!(sregs.tr.selector, 24);
        assert_eq!(sregs.gdt, X86DescriptorTable { base: layout::GDT_START, limit: 31 });
        assert_eq!(read_u64(&memory, layout::GDT_START + 8), 0x00af_9b00_0000_ffff);
        assert_eq!(read_u64(&memory, layout::PML4_START), layout::PDPTE_START | 3);
        assert_eq!(read_u64(&memory, layout::PDPTE_START), layout::PDE_START | 3);
        assert_eq!(read_u64(&memory, layout::PDE_START + 8), 0x20_0083);
        assert_eq!(read_u64(&memory, layout::PDE_START + 511 * 8), (511 << 21) | 0x83);
        assert_eq!(sregs.apic_base & !0xfff, layout::LAPIC_START);
    }

    #[test]
    fn pvh_entry_gets_flat_protected_mode_without_paging() {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let entry = KernelEntry {
            protocol: BootProtocol::Pvh,
            entry: 0x100_0000,
            kernel_start: 0x10_0000,
            kernel_end: 0x200_0000,
            initrd: None,
        };
        let (regs, sregs) = setup_boot_cpu(&memory, &entry).expect("setup");
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rbx, layout::PVH_INFO_START);
        assert_eq!(regs.rflags, 2);
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert!(sregs.cs.db && !sregs.cs.l && sregs.cs.type_ == 0xb);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert!(sregs.ss.db && sregs.ss.type_ == 3);
        assert_eq!((sregs.tr.type_, sregs.tr.limit), (0xb, 0x67));
    }

    #[test]
    fn bzimage_is_loaded_with_a_filled_zero_page() {
        let initrd = vec![0x5au8; 10_000];
        let (memory, result) = load(&synthetic_bzimage(), Some(&initrd), "console=ttyS0");
        let entry = result.expect("load bzImage");
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot64);
        assert_eq!(entry.entry, layout::KERNEL_START + 0x200);
        let mut payload = [0u8; 4];
        memory.read_slice(&mut payload, GuestAddress(layout::KERNEL_START)).expect("read");
        assert_eq!(payload, [0xab; 4]);

        let params: boot_params =
            memory.read_obj(GuestAddress(layout::ZERO_PAGE_START)).expect("zero page");
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ hdr.heap_end_ptr }, 0xfe00 - 0x200);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_START);
        let (addr, size) = entry.initrd.expect("initrd placed");
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (addr as u32, 10_000));
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= RAM_MIB << 20 && addr + size > (RAM_MIB << 20) - PAGE_SIZE);
        assert!(addr >= entry.kernel_end);
        assert_eq!(params.e820_entries, 4);
        let third = params.e820_table[2];
        assert_eq!(({ third.addr }, { third.size }), (0x10_0000, (RAM_MIB << 20) - 0x10_0000));

        let mut cmdline = [0u8; 14];
        memory.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START)).expect("read");
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }

    #[test]
    fn framebuffer_turns_a_pvh_elf_into_a_64bit_boot_with_screen_info() {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let kernel = file_with(&synthetic_elf(true));
        let fb = BootFramebufferInfo {
            base: 0xc000_0000,
            size: 16 << 20,
            width: 1024,
            height: 768,
            stride: 4096,
        };
        let entry =
            load_kernel(&memory, &KernelBoot { framebuffer: Some(fb), ..boot_of(kernel.path()) })
                .expect("load");
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot64);
        let params: boot_params =
            memory.read_obj(GuestAddress(layout::ZERO_PAGE_START)).expect("zero page");
        let si = params.screen_info;
        assert_eq!(si.orig_video_isVGA, 0x23);
        assert_eq!(({ si.lfb_base }, { si.lfb_size }), (0xc000_0000, 256));
        assert_eq!(({ si.lfb_width }, { si.lfb_height }, { si.lfb_linelength }), (1024, 768, 4096));
        assert_eq!((si.lfb_depth, si.red_pos, si.green_pos, si.blue_pos), (32, 16, 8, 0));
    }

    #[test]
    fn initrd_respects_the_kernels_initrd_addr_max() {
        let mut img = synthetic_bzimage();
        put32(&mut img, hdr_off!(initrd_addr_max), 0x1ff_ffff);
        let (_, result) = load(&img, Some(&[1u8; 100]), "");
        let (addr, size) = result.expect("load").initrd.expect("initrd");
        assert!(addr + size <= 0x200_0000, "initrd at {addr:#x} ends above initrd_addr_max");
    }

    #[test]
    fn pvh_elf_is_entered_through_its_note_with_start_info() {
        let (memory, result) = load(&synthetic_elf(true), Some(&[7u8; 5000]), "quiet");
        let entry = result.expect("load PVH ELF");
        assert_eq!(entry.protocol, BootProtocol::Pvh);
        assert_eq!(entry.entry, ENTRY_RAW + 0x10);
        let info: hvm_start_info =
            memory.read_obj(GuestAddress(layout::PVH_INFO_START)).expect("start info");
        assert_eq!((info.magic, info.version), (XEN_HVM_START_MAGIC_VALUE, 1));
        assert_eq!(
            (info.cmdline_paddr, info.rsdp_paddr),
            (layout::CMDLINE_START, layout::ACPI_START)
        );
        assert_eq!(info.memmap_entries, 4);
        let ram: hvm_memmap_table_entry =
            memory.read_obj(GuestAddress(info.memmap_paddr + 2 * 24)).expect("memmap entry");
        assert_eq!((ram.addr, ram.type_), (0x10_0000, 1));
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry =
            memory.read_obj(GuestAddress(info.modlist_paddr)).expect("module");
        assert_eq!(Some((module.paddr, module.size)), entry.initrd);
        assert!(info.modlist_paddr + 32 <= info.memmap_paddr);
        assert!(info.memmap_paddr + 24 * 8 <= layout::ZERO_PAGE_START);
    }

    #[test]
    fn elf_without_pvh_note_uses_the_64bit_entry_and_a_zero_page() {
        let (memory, result) = load(&synthetic_elf(false), None, "");
        let entry = result.expect("load ELF");
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot64);
        assert_eq!(entry.entry, ENTRY_RAW);
        let params: boot_params =
            memory.read_obj(GuestAddress(layout::ZERO_PAGE_START)).expect("zero page");
        assert_eq!({ params.hdr.header }, HDRS_MAGIC);
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!(params.e820_entries, 4);
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let path = Path::new("/nonexistent/hutch-vmlinuz");
        let err = load_kernel(&memory, &boot_of(path)).expect_err("must fail");
        assert!(matches!(&err, BootError::Read { what: "kernel", path: p, .. } if p == path));
        assert!(err.to_string().contains("/nonexistent/hutch-vmlinuz"));
    }

    #[test]
    fn empty_kernel_file_is_rejected() {
        let (_, result) = load(&[], None, "");
        assert!(matches!(result, Err(BootError::EmptyKernel { .. })), "{result:?}");
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        // A fixed pseudo-random sequence (xorshift), so the test is reproducible.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (_, result) = load(&bytes, None, "");
        let err = result.expect_err("must fail");
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err:?}");
        assert!(err.to_string().contains("not a Linux kernel image"));
    }

    #[test]
    fn truncated_bzimage_is_corrupt() {
        let img = synthetic_bzimage();
        for len in [0x210, 0x300, 1024, 1024 + 16, img.len() - 1] {
            let (_, result) = load(&img[..len], None, "");
            eprintln!("len {len:#x}: {result:?}");
            assert!(
                matches!(result, Err(BootError::CorruptBzImage { .. })),
                "length {len:#x}: {result:?}"
            );
        }
    }

    #[test]
    fn bzimage_with_old_boot_protocol_is_refused() {
        let mut img = synthetic_bzimage();
        put16(&mut img, hdr_off!(version), 0x0204);
        let (_, result) = load(&img, None, "");
        let err = result.expect_err("must fail");
        assert!(matches!(err, BootError::BootProtocolTooOld { version: 0x0204, .. }));
        assert!(err.to_string().contains("2.04"), "{err}");
    }

    #[test]
    fn bzimage_header_shorter_than_its_version_is_corrupt() {
        let mut img = synthetic_bzimage();
        img[hdr_off!(jump) + 1] = 0x30;
        let (_, result) = load(&img, None, "");
        assert!(matches!(result, Err(BootError::CorruptBzImage { .. })), "{result:?}");
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let mut img = synthetic_bzimage();
        put16(&mut img, hdr_off!(xloadflags), 0);
        let (_, result) = load(&img, None, "");
        assert!(matches!(result, Err(BootError::Not64Bit { .. })), "{result:?}");
    }

    #[test]
    fn kernel_needing_more_than_guest_ram_is_refused() {
        let mut img = synthetic_bzimage();
        put32(&mut img, hdr_off!(init_size), 0x1000_0000);
        let (_, result) = load(&img, None, "");
        assert!(matches!(result, Err(BootError::KernelTooBig { .. })), "{result:?}");
    }

    #[test]
    fn oversized_cmdline_is_refused() {
        let long = "x".repeat(2048);
        let (_, result) = load(&synthetic_bzimage(), None, &long);
        assert!(
            matches!(result, Err(BootError::CmdlineTooLong { len: 2048, max: 2047 })),
            "{result:?}"
        );
        let (_, result) = load(&synthetic_elf(true), None, &long);
        assert!(matches!(result, Err(BootError::CmdlineTooLong { .. })), "{result:?}");
        let (_, result) = load(&synthetic_bzimage(), None, "a\0b");
        assert!(matches!(result, Err(BootError::CmdlineHasNul)), "{result:?}");
    }

    #[test]
    fn initrd_bigger_than_ram_is_refused() {
        let initrd = vec![0u8; (RAM_MIB as usize + 1) << 20];
        let (_, result) = load(&synthetic_bzimage(), Some(&initrd), "");
        assert!(matches!(result, Err(BootError::InitrdTooBig { .. })), "{result:?}");
        // Just too big to fit above the kernel's decompression area is refused too.
        let initrd = vec![0u8; (RAM_MIB as usize - 17) << 20];
        let (_, result) = load(&synthetic_bzimage(), Some(&initrd), "");
        assert!(matches!(result, Err(BootError::InitrdTooBig { .. })), "{result:?}");
    }

    #[test]
    fn mutated_headers_never_panic() {
        let memory = create_guest_memory(RAM_MIB).expect("guest memory");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kernel");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for base in [synthetic_bzimage(), synthetic_elf(true)] {
            for _ in 0..500 {
                let mut img = base.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % 0x300) as usize;
                    img[at] = next() as u8;
                }
                std::fs::write(&path, &img).expect("write kernel");
                // Any result is fine; a panic fails the test.
                let _ = load_kernel(&memory, &boot_of(&path));
            }
        }
    }

    #[test]
    fn hostile_elf_headers_are_rejected_without_panic() {
        let good = synthetic_elf(true);
        let mut cases: Vec<Vec<u8>> = Vec::new();
        let mut huge_phnum = good.clone();
        put16(&mut huge_phnum, offset_of!(Elf64_Ehdr, e_phnum), 0xffff);
        cases.push(huge_phnum);
        let mut bad_phoff = good.clone();
        put64(&mut bad_phoff, offset_of!(Elf64_Ehdr, e_phoff), u64::MAX - 8);
        cases.push(bad_phoff);
        let mut wrap = good.clone();
        put64(&mut wrap, 64 + offset_of!(Elf64_Phdr, p_paddr), u64::MAX - 0x10);
        cases.push(wrap);
        let mut low = good.clone();
        put64(&mut low, 64 + offset_of!(Elf64_Phdr, p_paddr), 0);
        cases.push(low);
        let mut bad_note = good.clone();
        put32(&mut bad_note, 64 + 2 * 56, u32::MAX); // namesz
        cases.push(bad_note);
        cases.push(good[..100].to_vec());
        for (i, img) in cases.iter().enumerate() {
            let (_, result) = load(img, None, "");
            eprintln!("case {i}: {result:?}");
            assert!(
                matches!(result, Err(BootError::CorruptElf { .. } | BootError::Load { .. })),
                "case {i}: {result:?}"
            );
        }
        let mut arm = good.clone();
        put16(&mut arm, offset_of!(Elf64_Ehdr, e_machine), 183);
        let (_, result) = load(&arm, None, "");
        assert!(matches!(result, Err(BootError::Not64Bit { .. })), "{result:?}");
    }
}
