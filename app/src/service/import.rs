//! Import: makes a library VM around an existing disk image or an OVA appliance. The CLI
//! (`hutch import`) and the GUI (drag and drop) both call [`import`].
//!
//! ```text
//!   disk image ──convert──▶ vms/NAME/disk.qcow2            (default)
//!              └─overlay──▶ vms/NAME/disk.qcow2 ─backing─▶ original   (--in-place, foreign)
//!              └─────────── original used as is               (--in-place, raw or qcow2)
//!   OVA ──tar member──▶ vms/NAME/.diskN.extract ──convert──▶ vms/NAME/diskN.qcow2
//! ```
//! The VM directory is claimed first (so two imports never share a name) and `vm.toml` is
//! written last: until then `hutch list` does not show the VM. Any failure or cancel removes
//! the directory and everything in it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use disk::convert::{self, ConvertOptions, NewImage};
use disk::ova::Ova;
use disk::{BlockBackend, DiskErrorKind, ImageFormat, OpenOptions};

use super::disk::Progress;
use crate::library::{self, BootMode, DiskEntry, Library, VmConfig, DEFAULT_CMDLINE};

/// CPUs and memory when neither the command line nor an OVF says.
const DEFAULT_CPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Bytes copied at a time when extracting an OVA member.
const EXTRACT_CHUNK: usize = 4 << 20;

/// What to import and how.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Exactly this name (an existing VM of that name is an error); `None` derives one from
    /// the OVF or the file name, adding "-2", "-3"... if taken.
    pub name: Option<String>,
    pub in_place: bool,
    /// `None`: the demo guest's kernel and initrd (see [`default_guest`]).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Boot this firmware; `None` (and no kernel): the one the OVF or the image's partition
    /// table asks for, else the demo guest's kernel (an ISO: UEFI).
    pub firmware: Option<BootMode>,
    /// An ISO's VM gets a new blank disk of this many bytes to install on (default
    /// [`DEFAULT_INSTALL_DISK_BYTES`]).
    pub new_disk_bytes: Option<u64>,
}

/// The disk an ISO's VM installs on when the user does not say: 20 GiB (a sparse qcow2).
pub const DEFAULT_INSTALL_DISK_BYTES: u64 = 20 << 30;

/// How one disk of the new VM came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOrigin {
    /// Converted from a source of this format into the VM's directory.
    Converted(ImageFormat),
    /// The source image itself.
    InPlace(ImageFormat),
    /// A qcow2 overlay over the source image.
    Overlay(ImageFormat),
    /// A new blank disk of this many bytes (an ISO's VM installs on it).
    New(u64),
}

/// The VM [`import`] created.
#[derive(Debug, Clone)]
pub struct ImportOutcome {
    pub name: String,
    pub dir: PathBuf,
    pub config: VmConfig,
    pub disks: Vec<(PathBuf, DiskOrigin)>,
    /// Things worth telling the user (clamped OVF numbers, manifest mismatches...).
    pub warnings: Vec<String>,
    /// What the VM boots and why, for the user ("UEFI, as its GPT has an EFI system
    /// partition").
    pub boots: String,
}

/// Creates a VM in `library` from the disk image or OVA at `source`. `progress(done, total)`
/// follows the data copied; returning `false` cancels. On any error or cancel nothing is
/// left behind (the error of a cancel contains a `DiskError` of kind `Cancelled`).
pub fn import(
    library: &Library,
    source: &Path,
    options: &ImportOptions,
    progress: Progress<'_>,
) -> anyhow::Result<ImportOutcome> {
    let source =
        std::path::absolute(source).with_context(|| format!("Cannot use {}", source.display()))?;
    let format =
        disk::detect(&source).with_context(|| format!("Cannot read {}", source.display()))?;
    if format == ImageFormat::Iso {
        return import_iso(library, &source, options);
    }
    let mut warnings = Vec::new();
    let ova = if format == ImageFormat::Ova {
        if options.in_place {
            bail!("--in-place does not work for an OVA: its disks are inside the archive");
        }
        let ova =
            Ova::open(&source).with_context(|| format!("Cannot read {}", source.display()))?;
        if ova.descriptor().disks.is_empty() {
            bail!("{} declares no disks", source.display());
        }
        warnings.extend(ova.problems().iter().cloned());
        Some(ova)
    } else {
        None
    };
    let (ovf_name, ovf_cpus, ovf_memory) = match &ova {
        Some(o) => {
            let d = o.descriptor();
            (Some(d.name.clone()), Some(d.cpus), Some(d.memory_mib))
        }
        None => (None, None, None),
    };

    // Everything that can be checked is checked before copying gigabytes: what the VM boots
    // (an OVA whose OVF does not say is looked at once its disks are converted).
    let mut boot = match (&options.kernel, options.firmware, &ova) {
        (Some(kernel), _, _) => {
            Some(Boot::Kernel(kernel.clone(), options.initrd.clone(), "the kernel given".into()))
        }
        (None, Some(mode), _) => Some(Boot::Firmware(mode, "as asked".into())),
        (None, None, Some(ova)) => {
            ova.descriptor().firmware.map(|f| Boot::Firmware(mode_of(f), "as its OVF says".into()))
        }
        (None, None, None) => {
            let (_, image) = open_source_image(&source)?;
            Some(boot_of_disk(image.as_ref(), &source, options)?)
        }
    };
    let mut cpus = options.cpus.or(ovf_cpus).unwrap_or(DEFAULT_CPUS);
    let mut memory_mib = options.memory_mib.or(ovf_memory).unwrap_or(DEFAULT_MEMORY_MIB);
    if options.cpus.is_none() && cpus > library::MAX_CPUS {
        warnings.push(format!("the OVF asks for {cpus} CPUs; using {}", library::MAX_CPUS));
        cpus = library::MAX_CPUS;
    }
    if options.memory_mib.is_none() && memory_mib > library::MAX_MEMORY_MIB {
        warnings
            .push(format!("the OVF asks for {memory_mib} MiB; using {}", library::MAX_MEMORY_MIB));
        memory_mib = library::MAX_MEMORY_MIB;
    }
    let cmdline = options.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    let mut config = VmConfig::new(PathBuf::new(), None, cmdline, Vec::new(), cpus, memory_mib);
    if let Some(boot) = &boot {
        boot.apply(&mut config)?;
    }

    let base = match (&options.name, &ovf_name) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) if !n.trim().is_empty() => sanitize_name(n),
        _ => sanitize_name(&source.file_stem().unwrap_or_default().to_string_lossy()),
    };
    let claim = claim_vm_dir(library, &base, options.name.is_some())?;
    let dir = claim.path.clone();
    let name = claim.name.clone();

    let mut disks = Vec::new();
    if let Some(ova) = &ova {
        let descriptor = ova.descriptor();
        let total: u64 = descriptor.disks.iter().map(|d| d.member_size.max(1)).sum();
        let mut before = 0u64;
        for (i, d) in descriptor.disks.iter().enumerate() {
            let weight = d.member_size.max(1);
            // This disk's share of the bar: half extraction, half conversion.
            let scaled = |phase: u64, done: u64, of: u64| {
                let part =
                    if of == 0 { 0 } else { (weight as u128 * done as u128 / of as u128) as u64 };
                progress(before + (phase * weight + part) / 2, total)
            };
            // Under its own name: a VMDK's embedded descriptor names its extent file.
            let staging = dir.join(format!(".extract-{}", i + 1));
            fs::create_dir(&staging)
                .with_context(|| format!("Cannot create {}", staging.display()))?;
            let _remove = RemoveOnDrop(staging.clone());
            let extracted = staging.join(member_file_name(&d.file_name)?);
            extract(&source, d.member_offset, d.member_size, &extracted, &|a, b| scaled(0, a, b))
                .with_context(|| format!("Cannot extract {} from {}", d.file_name, source.display()))?;
            let (fmt, image) = open_source_image(&extracted)
                .with_context(|| format!("Cannot open {} from the OVA", d.file_name))?;
            let target = dir.join(disk_file_name(i));
            convert_into(image.as_ref(), &target, &|a, b| scaled(1, a, b))
                .with_context(|| format!("Cannot convert {}", d.file_name))?;
            disks.push((target, DiskOrigin::Converted(fmt)));
            before += weight;
        }
    } else {
        let target = dir.join(disk_file_name(0));
        if options.in_place && matches!(format, ImageFormat::Raw | ImageFormat::Qcow2) {
            // Open it once as the VM will: for writing.
            disk::open_image(&source, OpenOptions { writable: true }).with_context(|| {
                format!("Cannot use {} in place (it must be writable)", source.display())
            })?;
            disks.push((source.clone(), DiskOrigin::InPlace(format)));
        } else if options.in_place {
            let (fmt, image) = open_source_image(&source)?;
            let overlay = NewImage::create_with_backing(
                &target,
                ImageFormat::Qcow2,
                image.size(),
                Some((&source, fmt)),
            )
            .with_context(|| format!("Cannot create an overlay over {}", source.display()))?;
            overlay.commit(false)?;
            disks.push((target, DiskOrigin::Overlay(fmt)));
        } else {
            let (fmt, image) = open_source_image(&source)?;
            convert_into(image.as_ref(), &target, progress)
                .with_context(|| format!("Cannot convert {}", source.display()))?;
            disks.push((target, DiskOrigin::Converted(fmt)));
        }
    }

    if boot.is_none() {
        let first = disks.first().map(|(p, _)| p.clone()).unwrap_or_default();
        let image = disk::open_image(&first, OpenOptions { writable: false })
            .with_context(|| format!("Cannot open {}", first.display()))?;
        let found = boot_of_disk(image.as_ref(), &source, options)?;
        found.apply(&mut config)?;
        boot = Some(found);
    }
    let boots = boot.map(|b| b.describe()).unwrap_or_default();
    config.disks =
        disks.iter().map(|(p, _)| DiskEntry { path: p.clone(), readonly: false }).collect();
    let vm = library.vm(&name)?;
    vm.write_config(&config)?;
    claim.keep();
    Ok(ImportOutcome { name, dir, config, disks, warnings, boots })
}

/// An ISO becomes a VM that installs from it: the ISO as its CD, a new blank qcow2 disk,
/// UEFI unless asked otherwise. The ISO stays where it is.
fn import_iso(
    library: &Library,
    source: &Path,
    options: &ImportOptions,
) -> anyhow::Result<ImportOutcome> {
    if options.kernel.is_some() || options.in_place {
        bail!(
            "{} is an ISO image (installation media): it boots through firmware, so --kernel \
             and --in-place do not apply",
            source.display()
        );
    }
    let mode = options.firmware.unwrap_or(BootMode::Uefi);
    let size = options.new_disk_bytes.unwrap_or(DEFAULT_INSTALL_DISK_BYTES);
    if size == 0 || !size.is_multiple_of(512) {
        bail!("A new disk of {size} bytes: the size must be a non-zero multiple of 512 bytes");
    }
    let cpus = options.cpus.unwrap_or(DEFAULT_CPUS);
    let memory_mib = options.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    let mut config = VmConfig::new(
        PathBuf::new(),
        None,
        DEFAULT_CMDLINE.to_string(),
        Vec::new(),
        cpus,
        memory_mib,
    );
    config.iso = Some(source.to_path_buf());
    let boot = Boot::Firmware(mode, "to install from the ISO".into());
    boot.apply(&mut config)?;

    let base = match &options.name {
        Some(n) => n.clone(),
        None => sanitize_name(&source.file_stem().unwrap_or_default().to_string_lossy()),
    };
    let claim = claim_vm_dir(library, &base, options.name.is_some())?;
    let target = claim.path.join(disk_file_name(0));
    let image = NewImage::create(&target, ImageFormat::Qcow2, size)
        .with_context(|| format!("Cannot create the disk {}", target.display()))?;
    image.commit(false)?;
    config.disks = vec![DiskEntry { path: target.clone(), readonly: false }];
    let vm = library.vm(&claim.name)?;
    vm.write_config(&config)?;
    let (name, dir) = (claim.name.clone(), claim.path.clone());
    claim.keep();
    Ok(ImportOutcome {
        name,
        dir,
        config,
        disks: vec![(target, DiskOrigin::New(size))],
        warnings: Vec::new(),
        boots: boot.describe(),
    })
}

/// What an imported VM boots, and why (for the user).
enum Boot {
    Kernel(PathBuf, Option<PathBuf>, String),
    Firmware(BootMode, String),
}

impl Boot {
    /// Sets `config` up to boot this, checking that its files (or the firmware) are there.
    fn apply(&self, config: &mut VmConfig) -> anyhow::Result<()> {
        match self {
            Boot::Kernel(kernel, initrd, _) => {
                config.boot = BootMode::Kernel;
                config.kernel = kernel.clone();
                config.initrd = initrd.clone();
            }
            Boot::Firmware(mode, _) => {
                config.boot = *mode;
                config.kernel = PathBuf::new();
                config.initrd = None;
            }
        }
        config.validate()?;
        config.make_paths_absolute()?;
        config.check_files()?;
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            Boot::Kernel(kernel, _, why) => format!("the kernel {} ({why})", kernel.display()),
            Boot::Firmware(BootMode::Uefi, why) => format!("its own OS with UEFI firmware, {why}"),
            Boot::Firmware(BootMode::Bios, why) => format!("its own OS with BIOS firmware, {why}"),
            Boot::Firmware(BootMode::Kernel, why) => format!("a kernel ({why})"),
        }
    }
}

fn mode_of(firmware: disk::BootFirmware) -> BootMode {
    match firmware {
        disk::BootFirmware::Uefi => BootMode::Uefi,
        disk::BootFirmware::Bios => BootMode::Bios,
    }
}

/// The firmware `image`'s partition table asks for; without one, the demo guest's kernel
/// (the disk is data, or boots in a way Hutch cannot tell).
fn boot_of_disk(
    image: &dyn BlockBackend,
    source: &Path,
    options: &ImportOptions,
) -> anyhow::Result<Boot> {
    let found = disk::boot_firmware(image)
        .with_context(|| format!("Cannot read the partition table of {}", source.display()))?;
    match found {
        Some(disk::BootFirmware::Uefi) => {
            Ok(Boot::Firmware(BootMode::Uefi, "as its GPT has an EFI system partition".into()))
        }
        Some(disk::BootFirmware::Bios) => {
            Ok(Boot::Firmware(BootMode::Bios, "as its MBR has boot code".into()))
        }
        None => match default_guest() {
            Some((kernel, initrd)) => Ok(Boot::Kernel(
                kernel,
                options.initrd.clone().or(initrd),
                "the demo guest's: the disk has no boot loader Hutch recognises".into(),
            )),
            None => bail!(
                "{} has no boot loader Hutch recognises (no GPT with an EFI system partition, \
                 no MBR boot code), and the demo guest's kernel (build/guest/vmlinuz, made by \
                 tests/guest/build.sh) was not found to boot instead: pass --firmware uefi|bios \
                 or --kernel",
                source.display()
            ),
        },
    }
}

/// The demo guest's kernel and initramfs: `$HUTCH_GUEST_DIR` if set (and only there), else
/// `build/guest/` in the current directory, next to the executable's ancestors, or in the
/// source tree this binary was built from.
pub fn default_guest() -> Option<(PathBuf, Option<PathBuf>)> {
    let pick = |dir: &Path| {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.cpio.gz");
        kernel.is_file().then(|| (kernel, initrd.is_file().then_some(initrd)))
    };
    if let Some(dir) = std::env::var_os("HUTCH_GUEST_DIR").filter(|v| !v.is_empty()) {
        return pick(Path::new(&dir));
    }
    let mut candidates = vec![PathBuf::from("build/guest")];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|a| a.join("build/guest")));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"));
    candidates.iter().find_map(|d| pick(d))
}

/// A VM name from free text: invalid characters become '-', at most 64 characters.
pub fn sanitize_name(text: &str) -> String {
    let mut s: String = text
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    while s.starts_with('.') || s.starts_with('-') {
        s.remove(0);
    }
    s.truncate(library::MAX_NAME_LEN - 4);
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "imported".to_string()
    } else {
        s
    }
}

fn disk_file_name(index: usize) -> String {
    if index == 0 {
        "disk.qcow2".to_string()
    } else {
        format!("disk{}.qcow2", index + 1)
    }
}

/// A claimed VM directory, removed with its contents unless [`Claim::keep`] is called.
struct Claim {
    name: String,
    path: PathBuf,
    kept: bool,
}

impl Claim {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates the VM directory for `base` (or, unless `exact`, the first free of `base-2`,
/// `base-3`...). `create_dir` is the atomic claim.
fn claim_vm_dir(library: &Library, base: &str, exact: bool) -> anyhow::Result<Claim> {
    library::validate_name(base)?;
    for n in 1..=100 {
        let name = if n == 1 { base.to_string() } else { format!("{base}-{n}") };
        let vm = library.vm(&name)?;
        if let Some(parent) = vm.dir().parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("Cannot create {}", parent.display()))?;
        }
        match fs::create_dir(vm.dir()) {
            Ok(()) => return Ok(Claim { name, path: vm.dir().to_path_buf(), kept: false }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if exact {
                    bail!("A VM named '{name}' already exists; choose another --name");
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("Cannot create {}", vm.dir().display()))
            }
        }
    }
    bail!("VMs named '{base}' through '{base}-100' already exist; choose a --name")
}

/// Opens a disk image for reading; an OVA inside an OVA or an ISO is refused.
fn open_source_image(path: &Path) -> anyhow::Result<(ImageFormat, Box<dyn BlockBackend>)> {
    super::disk::open_source(path)
}

/// Converts `src` into a new qcow2 image at `target`.
fn convert_into(
    src: &dyn BlockBackend,
    target: &Path,
    progress: &dyn Fn(u64, u64) -> bool,
) -> anyhow::Result<()> {
    let image = NewImage::create(target, ImageFormat::Qcow2, src.size())?;
    convert::convert_into(src, &image, &ConvertOptions::default(), progress)?;
    image.commit(false)?;
    Ok(())
}

/// Copies `len` bytes at `offset` of `ova` to a new file `dest`, cancellable.
fn extract(
    ova: &Path,
    offset: u64,
    len: u64,
    dest: &Path,
    progress: &dyn Fn(u64, u64) -> bool,
) -> anyhow::Result<()> {
    let input = File::open(ova)?;
    let output = fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    let mut buf = vec![0u8; EXTRACT_CHUNK.min(len.max(1) as usize)];
    let mut done = 0u64;
    while done < len {
        if !progress(done, len) {
            return Err(disk::DiskError::new(DiskErrorKind::Cancelled, "extract").into());
        }
        let n = (len - done).min(buf.len() as u64) as usize;
        input.read_exact_at(&mut buf[..n], offset + done)?;
        output.write_all_at(&buf[..n], done)?;
        done += n as u64;
    }
    progress(len, len);
    Ok(())
}

/// The last component of an OVA member name, refusing names that are no file name at all.
fn member_file_name(member: &str) -> anyhow::Result<PathBuf> {
    match Path::new(member).file_name() {
        Some(n) if !n.is_empty() => Ok(PathBuf::from(n)),
        _ => bail!("The OVA names a disk file '{member}' that is not a file name"),
    }
}

/// Deletes a directory and its contents when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn names_from_free_text_are_valid_vm_names() {
        for (text, want) in [
            ("Ubuntu 22.04 Server", "Ubuntu-22.04-Server"),
            ("  .hidden", "hidden"),
            ("ÄÖÜ", "imported"),
            ("vm", "vm"),
        ] {
            let got = sanitize_name(text);
            assert_eq!(got, want);
            library::validate_name(&got).unwrap();
        }
        let long = sanitize_name(&"x".repeat(200));
        // Room left for a "-NN" suffix.
        assert!(library::validate_name(&format!("{long}-99")).is_ok());
    }

    #[test]
    fn taken_names_get_a_suffix_unless_exact() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let a = claim_vm_dir(&lib, "vm", false).unwrap();
        let b = claim_vm_dir(&lib, "vm", false).unwrap();
        assert_eq!((a.name.as_str(), b.name.as_str()), ("vm", "vm-2"));
        let err = claim_vm_dir(&lib, "vm", true).err().unwrap();
        assert!(err.to_string().contains("'vm' already exists"), "{err}");
        a.keep();
        drop(b);
        assert!(!home.path().join("vms/vm-2").exists());
        assert!(home.path().join("vms/vm").exists());
    }
}
