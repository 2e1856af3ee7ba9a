//! The VM library on disk: `$HUTCH_HOME/vms/NAME/` with `vm.toml` (the configuration), and the
//! per-run records next to it: `pid.json` (a running VM process), `last-exit.json` (how the
//! last run ended), `vm.lock` (held by the VM process while it runs), `hutch.log` and
//! `serial.log`.
//!
//! "Running" means "some process holds `vm.lock`": a lock dies with its process, so stale pid
//! files and reused pids never make a stopped VM look alive.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmm::machine::{DiskConfig, MachineConfig};

use crate::fsutil::write_atomic;

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_CPUS: u32 = vmm::machine::MAX_VCPUS;
/// 1 TiB: a hard ceiling whatever the host (the host's RAM is checked when the VM starts).
pub const MAX_MEMORY_MIB: u64 = vmm::arch::x86_64::layout::MAX_GUEST_RAM_MIB;
/// The kernel console on the screen (tty0) and on serial; serial last, so it is /dev/console.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0 reboot=k panic=-1";
const CONFIG_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("Invalid VM name '{0}': use 1 to 64 of A-Z a-z 0-9 . _ - and do not start with '.'")]
    InvalidName(String),
    #[error("Cannot find the VM library: set HUTCH_HOME, XDG_DATA_HOME or HOME")]
    NoHome,
    #[error("A VM named '{0}' already exists")]
    Exists(String),
    #[error("No VM named '{0}'")]
    NotFound(String),
    #[error("VM '{0}' is running; stop it first")]
    Running(String),
    #[error("Invalid value for {what}: {reason}")]
    InvalidConfig { what: &'static str, reason: String },
    #[error("Cannot use {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("Cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, LibraryError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LibraryError + '_ {
    move |source| LibraryError::Io { path: path.to_path_buf(), source }
}

/// Checks a VM name: `[A-Za-z0-9._-]{1,64}`, not starting with '.' (hidden names are ours).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LibraryError::InvalidName(name.to_string()))
    }
}

/// One disk as stored in `vm.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// `vm.toml`: what a VM boots and with how much. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Version of this file's layout, for later migrations.
    #[serde(default = "default_format")]
    pub format: u32,
    /// What the VM boots. Files from before firmware boot have no `boot` key: a kernel.
    #[serde(default, skip_serializing_if = "BootMode::is_kernel")]
    pub boot: BootMode,
    /// Installation media, attached read-only: first while the VM's first disk has no boot
    /// loader (a blank disk to install on), after the disks once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<PathBuf>,
    /// The kernel (`boot = "kernel"`); a UEFI VM has none.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// A screen (boot framebuffer, virtio-gpu) and keyboard/tablet (virtio-input); on a
    /// firmware VM a bochs-display, with keys through the PS/2 keyboard.
    #[serde(default = "default_display")]
    pub display: bool,
    /// Firmware booted instead of the kernel (`hutch run --firmware`); not in vm.toml yet.
    /// Boxed: a VmConfig travels in the GUI's jobs, which stay small.
    #[serde(skip)]
    pub firmware: Option<Box<vmm::board::FirmwareBoot>>,
    /// Where the CD goes among the machine's disks, when that is fixed already: a restored
    /// machine must have its disks in the order the snapshot was taken with. None: decided
    /// from the first disk (see `cd_is_first`).
    #[serde(skip)]
    pub cd_first: Option<bool>,
    /// Whether the machine has a CD drive, when that is fixed already (a running or
    /// restored machine keeps the drive it was built with, empty or not). None: firmware
    /// VMs always have one, kernel-boot VMs only with an ISO (see `has_cd_drive`).
    #[serde(skip)]
    pub cd_drive: Option<bool>,
    /// The network card. Files from before networking have none, so their VMs (and snapshots)
    /// keep the devices they had; new VMs get `user`.
    #[serde(default, skip_serializing_if = "NetMode::is_none")]
    pub net: NetMode,
    /// The card's MAC address, made once per VM so the guest's configuration stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host ports forwarded into the guest, in `--forward` syntax (`tcp:127.0.0.1:2222-:22`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<String>,
    /// The guest cannot reach the host's own services through the gateway (10.0.2.2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate_from_host: bool,
    /// The card's MTU, told to the guest through virtio-net (slirp's DHCP has no MTU option).
    /// New VMs get [`USER_NET_MTU`]; files without it keep Ethernet's 1500, which their
    /// guests (and snapshots) were made with.
    #[serde(default = "legacy_mtu", skip_serializing_if = "is_legacy_mtu")]
    pub mtu: u16,
    // Tables last: TOML needs plain values before arrays of tables.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskEntry>,
}

/// A built machine's CD drive: whether it has one, whether it comes before the disks, and
/// the ISO in it now (None: empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdDrive {
    pub present: bool,
    pub first: bool,
    pub iso: Option<PathBuf>,
}

/// What a VM boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// A Linux kernel the VMM loads (PC board).
    #[default]
    Kernel,
    /// The host's UEFI firmware (`crate::firmware`) on the Q35 board, with the VM's own
    /// variable store (`vars.fd` in its directory).
    Uefi,
    /// The host's SeaBIOS on the Q35 board.
    Bios,
}

impl BootMode {
    fn is_kernel(&self) -> bool {
        *self == BootMode::Kernel
    }
}

/// Whether the disk at `path` has a boot loader firmware recognises (an unreadable disk has
/// none here; the VM's start reports why it cannot be opened).
fn has_boot_loader(path: &Path) -> bool {
    disk::open_image(path, disk::OpenOptions { writable: false })
        .ok()
        .and_then(|image| disk::boot_firmware(image.as_ref()).ok().flatten())
        .is_some()
}

fn path_is_empty(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

/// How a VM reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No network card at all.
    #[default]
    None,
    /// A virtio-net card behind user-mode NAT (DHCP, DNS, port forwards; no root needed).
    User,
}

impl NetMode {
    fn is_none(&self) -> bool {
        *self == NetMode::None
    }

    pub fn name(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::User => "user",
        }
    }
}

impl std::str::FromStr for NetMode {
    type Err = LibraryError;

    fn from_str(s: &str) -> Result<NetMode> {
        match s {
            "none" => Ok(NetMode::None),
            "user" => Ok(NetMode::User),
            _ => Err(LibraryError::InvalidConfig {
                what: "net",
                reason: format!("'{s}' is not a network mode (user or none)"),
            }),
        }
    }
}

/// A new locally administered unicast MAC in QEMU's 52:54:00 range: the random low three bytes
/// keep two VMs on one host apart.
pub fn random_mac() -> String {
    let mut low = [0u8; 3];
    // /dev/urandom does not fail on Linux or macOS; should it, the time still varies per VM.
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut low))
        .is_err()
    {
        let nanos =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        low.copy_from_slice(&nanos.to_le_bytes()[..3]);
    }
    format_mac([0x52, 0x54, 0x00, low[0], low[1], low[2]])
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

impl VmConfig {
    /// The forwards, each a valid spec and no host socket twice.
    pub fn parsed_forwards(&self) -> Result<Vec<net::slirp::Forward>> {
        let bad = |reason: String| LibraryError::InvalidConfig { what: "forwards", reason };
        let mut forwards: Vec<net::slirp::Forward> = Vec::with_capacity(self.forwards.len());
        for spec in &self.forwards {
            let forward =
                spec.parse::<net::slirp::Forward>().map_err(|e| bad(format!("'{spec}': {e}")))?;
            if forwards.iter().any(|f| f.same_host_socket(&forward)) {
                return Err(bad(format!("{} is forwarded twice", forward.host())));
            }
            forwards.push(forward);
        }
        Ok(forwards)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; a multicast address cannot be a card's.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bad = |reason: String| LibraryError::InvalidConfig { what: "mac", reason };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2);
        *byte = part
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| bad(format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)")))?;
    }
    if parts.next().is_some() {
        return Err(bad(format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)")));
    }
    if mac[0] & 1 != 0 {
        return Err(bad(format!("{text} is a multicast address")));
    }
    Ok(mac)
}

fn default_format() -> u32 {
    CONFIG_FORMAT
}

fn default_display() -> bool {
    true
}

/// The MTU of new VMs' user-mode network: the largest libslirp's 16-bit IP length takes
/// (as passt and slirp4netns use). Per-packet costs dominate a NAT in user space: at 1500
/// a bulk transfer is ~44× more frames, kicks and interrupts.
pub const USER_NET_MTU: u16 = 65520;
const LEGACY_MTU: u16 = 1500;

fn legacy_mtu() -> u16 {
    LEGACY_MTU
}

fn is_legacy_mtu(mtu: &u16) -> bool {
    *mtu == LEGACY_MTU
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

impl VmConfig {
    pub fn new(
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        disks: Vec<DiskEntry>,
        cpus: u32,
        memory_mib: u64,
    ) -> VmConfig {
        VmConfig {
            format: CONFIG_FORMAT,
            boot: BootMode::Kernel,
            iso: None,
            kernel,
            initrd,
            cmdline,
            cpus,
            memory_mib,
            display: true,
            firmware: None,
            cd_first: None,
            cd_drive: None,
            net: NetMode::User,
            mac: Some(random_mac()),
            forwards: Vec::new(),
            isolate_from_host: false,
            mtu: USER_NET_MTU,
            disks,
        }
    }

    /// Checks the numbers and strings (not the files).
    pub fn validate(&self) -> Result<()> {
        let bad = |what, reason: String| Err(LibraryError::InvalidConfig { what, reason });
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return bad("cpus", format!("{} (must be 1 to {MAX_CPUS})", self.cpus));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return bad(
                "memory",
                format!("{} MiB (must be 1 to {MAX_MEMORY_MIB} MiB)", self.memory_mib),
            );
        }
        if self.cmdline.contains('\0') {
            return bad("cmdline", "contains a NUL byte".to_string());
        }
        if self.boot == BootMode::Kernel && self.firmware.is_none() && path_is_empty(&self.kernel) {
            return bad(
                "kernel",
                "none given (a VM boots a kernel unless boot = \"uefi\" or \"bios\")".into(),
            );
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        self.parsed_forwards()?;
        let mtus = vmm::virtio::net::MIN_MTU..=vmm::virtio::net::MAX_MTU;
        if !mtus.contains(&self.mtu) {
            return bad(
                "mtu",
                format!("{} (must be {} to {})", self.mtu, mtus.start(), mtus.end()),
            );
        }
        if self.format != CONFIG_FORMAT {
            return bad("format", format!("{} (this hutch reads {CONFIG_FORMAT})", self.format));
        }
        Ok(())
    }

    /// Checks that every file exists and can be opened as the VM will open it.
    pub fn check_files(&self) -> Result<()> {
        match &self.firmware {
            Some(firmware) => {
                check_file("firmware", &firmware.code, false)?;
                if let Some(vars) = &firmware.vars {
                    check_file("firmware variable store", vars, true)?;
                }
            }
            // The firmware is found (and the VM's store made) when the VM starts; a missing
            // one is an error here already.
            None if self.boot == BootMode::Uefi => {
                crate::firmware::find_uefi_in_env()?;
            }
            None if self.boot == BootMode::Bios => {
                crate::firmware::find_bios_in_env()?;
                if self.display {
                    crate::firmware::find_vga_bios_in_env()?;
                }
            }
            None => check_file("kernel", &self.kernel, false)?,
        }
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd, false)?;
        }
        if let Some(iso) = &self.iso {
            check_file("ISO", iso, false)?;
        }
        for disk in &self.disks {
            check_file("disk", &disk.path, !disk.readonly)?;
        }
        Ok(())
    }

    /// Puts `iso` in the VM's CD drive (an absolute path to a readable file), or empties the
    /// drive with None.
    pub fn set_iso(&mut self, iso: Option<&Path>) -> Result<()> {
        self.iso = match iso {
            Some(iso) => {
                check_file("ISO", iso, false)?;
                let path = std::path::absolute(iso).map_err(|source| LibraryError::File {
                    what: "ISO",
                    path: iso.to_path_buf(),
                    source,
                })?;
                Some(path)
            }
            None => None,
        };
        Ok(())
    }

    /// Makes every path absolute against the current directory (symlinks are kept as links).
    pub fn make_paths_absolute(&mut self) -> Result<()> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|source| LibraryError::File {
                what: "path",
                path: p.to_path_buf(),
                source,
            })
        };
        match &mut self.firmware {
            Some(firmware) => {
                firmware.code = abs(&firmware.code)?;
                if let Some(vars) = &mut firmware.vars {
                    *vars = abs(vars)?;
                }
            }
            None if path_is_empty(&self.kernel) => {}
            None => self.kernel = abs(&self.kernel)?,
        }
        if let Some(initrd) = &self.initrd {
            self.initrd = Some(abs(initrd)?);
        }
        if let Some(iso) = &self.iso {
            self.iso = Some(abs(iso)?);
        }
        for disk in &mut self.disks {
            disk.path = abs(&disk.path)?;
        }
        Ok(())
    }

    /// For `boot = "uefi"` (unless a firmware is set already): the host's UEFI firmware, and
    /// `nvram` as its variable store, copied from the firmware's template the first time so
    /// the guest's variables persist from then on. For `boot = "bios"`: the host's SeaBIOS.
    pub fn resolve_firmware(&mut self, nvram: &Path) -> Result<()> {
        if self.firmware.is_some() {
            return Ok(());
        }
        match self.boot {
            BootMode::Kernel => return Ok(()),
            BootMode::Bios => {
                let code = crate::firmware::find_bios_in_env()?;
                // The screen's bochs-display shows nothing under SeaBIOS without its ROM.
                let vga_bios = if self.display {
                    Some(crate::firmware::find_vga_bios_in_env()?)
                } else {
                    None
                };
                self.firmware =
                    Some(Box::new(vmm::board::FirmwareBoot { code, vars: None, vga_bios }));
                return Ok(());
            }
            BootMode::Uefi => {}
        }
        let found = crate::firmware::find_uefi_in_env()?;
        if crate::firmware::ensure_nvram(nvram, &found.vars_template)? {
            log::info!("made the UEFI variable store {}", nvram.display());
        }
        self.firmware = Some(Box::new(vmm::board::FirmwareBoot {
            code: found.code,
            vars: Some(nvram.to_path_buf()),
            vga_bios: None,
        }));
        Ok(())
    }

    /// Whether the machine gets the CD before its disks: while the first disk has no boot
    /// loader (firmware boots the first bootable disk), unless `cd_first` fixes it already.
    pub fn cd_is_first(&self) -> bool {
        self.has_cd_drive()
            && self.cd_first.unwrap_or_else(|| {
                self.iso.is_some() && !self.disks.first().is_some_and(|d| has_boot_loader(&d.path))
            })
    }

    /// The CD drive as this configuration builds it.
    pub fn cd(&self) -> CdDrive {
        CdDrive { present: self.has_cd_drive(), first: self.cd_is_first(), iso: self.iso.clone() }
    }

    /// Builds the drive as `cd` says: a machine restored or running keeps the drive it had.
    pub fn set_cd(&mut self, cd: &CdDrive) {
        self.cd_drive = Some(cd.present);
        self.cd_first = Some(cd.first);
        self.iso = cd.iso.clone();
    }

    /// Whether the machine gets a CD drive (which can then change its medium while the
    /// guest runs): a firmware VM always, empty without an ISO, as a PC has its drive; a
    /// kernel-boot VM only with an ISO. `cd_drive` fixes it for a built machine.
    pub fn has_cd_drive(&self) -> bool {
        self.cd_drive.unwrap_or(self.boot != BootMode::Kernel || self.iso.is_some())
    }

    /// The disks in the order the firmware sees them: the ISO first or last
    /// ([`Self::cd_is_first`]), the VM's disks in their order.
    fn machine_disks(&self) -> Vec<DiskConfig> {
        let disks = self.disks.iter().map(|d| DiskConfig {
            path: d.path.clone(),
            readonly: d.readonly,
            removable: false,
        });
        let cd = self.has_cd_drive().then(|| DiskConfig::removable(self.iso.clone())).into_iter();
        if self.cd_is_first() {
            cd.chain(disks).collect()
        } else {
            disks.chain(cd).collect()
        }
    }

    pub fn to_machine_config(&self) -> MachineConfig {
        MachineConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            disks: self.machine_disks(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            // Filled from the environment where the machine is built (vm_process).
            kernel_cache_dir: None,
            firmware: self.firmware.as_deref().cloned(),
        }
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain strings, numbers and paths cannot fail except for non-UTF-8
        // paths, which `from_toml` could not read back anyway; fall back to lossy paths.
        toml::to_string(self).unwrap_or_else(|_| {
            let lossy = |p: &Path| PathBuf::from(p.to_string_lossy().into_owned());
            let mut copy = self.clone();
            copy.kernel = lossy(&copy.kernel);
            copy.initrd = copy.initrd.as_deref().map(lossy);
            for d in &mut copy.disks {
                d.path = lossy(&d.path);
            }
            toml::to_string(&copy).unwrap_or_default()
        })
    }

    pub fn from_toml(text: &str) -> std::result::Result<VmConfig, toml::de::Error> {
        toml::from_str(text)
    }
}

fn check_file(what: &'static str, path: &Path, write: bool) -> Result<()> {
    let err = |source| LibraryError::File { what, path: path.to_path_buf(), source };
    let meta = fs::metadata(path).map_err(err)?;
    if meta.is_dir() {
        return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "is a directory")));
    }
    OpenOptions::new().read(true).write(write).open(path).map_err(err)?;
    Ok(())
}

/// Where the library lives: `$HUTCH_HOME`, else `$XDG_DATA_HOME/hutch`, else
/// `~/.local/share/hutch`.
#[derive(Debug, Clone)]
pub struct Library {
    root: PathBuf,
}

impl Library {
    pub fn from_env() -> Result<Library> {
        let var = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = if let Some(home) = var("HUTCH_HOME") {
            home
        } else if let Some(data) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
            data.join("hutch")
        } else if let Some(home) = var("HOME") {
            home.join(".local/share/hutch")
        } else {
            return Err(LibraryError::NoHome);
        };
        let root = std::path::absolute(&root).map_err(io_err(&root))?;
        Ok(Library { root })
    }

    pub fn at(root: PathBuf) -> Library {
        Library { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The directory of VM `name` (which need not exist).
    pub fn vm(&self, name: &str) -> Result<VmDir> {
        validate_name(name)?;
        Ok(VmDir { name: name.to_string(), dir: self.vms_dir().join(name) })
    }

    /// The directory of an existing VM.
    pub fn existing(&self, name: &str) -> Result<VmDir> {
        let vm = self.vm(name)?;
        if !vm.config_path().is_file() {
            return Err(LibraryError::NotFound(name.to_string()));
        }
        Ok(vm)
    }

    /// Names of all VMs, sorted. Half-created or foreign entries are skipped.
    pub fn names(&self) -> Result<Vec<String>> {
        let dir = self.vms_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if validate_name(&name).is_ok() && entry.path().join("vm.toml").is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Creates VM `name` with `config` (already validated and absolute).
    pub fn create(&self, name: &str, config: &VmConfig) -> Result<VmDir> {
        let vm = self.vm(name)?;
        let vms = self.vms_dir();
        fs::create_dir_all(&vms).map_err(io_err(&vms))?;
        // create_dir is the atomic claim on the name.
        match fs::create_dir(&vm.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(LibraryError::Exists(name.to_string()))
            }
            Err(e) => return Err(io_err(&vm.dir)(e)),
        }
        if let Err(e) = vm.write_config(config) {
            let _ = fs::remove_dir_all(&vm.dir);
            return Err(e);
        }
        Ok(vm)
    }

    /// Deletes a stopped VM's directory.
    pub fn delete(&self, name: &str) -> Result<()> {
        let vm = self.existing(name)?;
        let _lock = vm.try_lock()?.ok_or_else(|| LibraryError::Running(name.to_string()))?;
        // Rename first so the VM disappears at once even if removing its files is slow or
        // fails halfway; hidden names can never be VM names.
        let trash = self.vms_dir().join(format!(".deleting-{name}-{}", std::process::id()));
        fs::rename(&vm.dir, &trash).map_err(io_err(&vm.dir))?;
        fs::remove_dir_all(&trash).map_err(io_err(&trash))
    }
}

/// Written by the VM process when it has started: who it is and where its socket is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidFile {
    pub pid: u32,
    pub socket: PathBuf,
    /// Unix time, seconds.
    pub started_at: u64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    PowerOff,
    /// Written by releases before a guest's reboot was a reboot (it stopped the VM then);
    /// kept so their records stay readable.
    Reset,
    ForcedOff,
    Failed,
}

/// `last-exit.json`: written by the VM process as its last act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub reason: ExitKind,
    pub clean: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix time, seconds.
    pub at: u64,
}

impl ExitRecord {
    pub fn new(reason: ExitKind, error: Option<String>) -> ExitRecord {
        ExitRecord { clean: reason != ExitKind::Failed, reason, error, at: unix_now() }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// What the files on disk say about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskState {
    /// A process holds the VM lock; `pid` is absent while it is still starting.
    Running {
        pid: Option<PidFile>,
    },
    Stopped,
    /// The last run did not end cleanly; `error` says why if it got to say.
    Crashed {
        error: Option<String>,
    },
}

/// Opens (making it if needed) a file that exists only to be flocked.
fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

/// Held while a VM process runs (or while the VM is being deleted).
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

#[derive(Debug, Clone)]
pub struct VmDir {
    name: String,
    dir: PathBuf,
}

impl VmDir {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("vm.toml")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("pid.json")
    }
    pub fn last_exit_path(&self) -> PathBuf {
        self.dir.join("last-exit.json")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("hutch.log")
    }
    /// A UEFI VM's variable store (its NVRAM), made on first start.
    pub fn nvram_path(&self) -> PathBuf {
        self.dir.join("vars.fd")
    }

    pub fn serial_log_path(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    fn lock_path(&self) -> PathBuf {
        self.dir.join("vm.lock")
    }

    pub fn load_config(&self) -> Result<VmConfig> {
        let path = self.config_path();
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                LibraryError::NotFound(self.name.clone())
            } else {
                io_err(&path)(e)
            }
        })?;
        let config =
            VmConfig::from_toml(&text).map_err(|source| LibraryError::Parse { path, source })?;
        config.validate()?;
        Ok(config)
    }

    pub fn write_config(&self, config: &VmConfig) -> Result<()> {
        let path = self.config_path();
        write_atomic(&path, config.to_toml().as_bytes()).map_err(io_err(&path))
    }

    /// Waits for, then holds, the right to edit `vm.toml` (load, change, write) while its VM
    /// may run: two edits at once (two `hutch forward add`s, say) would otherwise each write
    /// back what it read and lose the other's. Separate from the VM lock, which a running VM
    /// process holds for as long as it runs.
    pub fn edit_lock(&self) -> Result<VmLock> {
        let path = self.dir.join("config.lock");
        let file = open_lock_file(&path)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_err(&path)(io::Error::last_os_error()));
        }
        Ok(VmLock { _file: file })
    }

    /// Takes the VM lock if nobody holds it; `None` if a VM process (or a delete) holds it.
    pub fn try_lock(&self) -> Result<Option<VmLock>> {
        self.try_flock(libc::LOCK_EX)
    }

    fn try_flock(&self, mode: libc::c_int) -> Result<Option<VmLock>> {
        let path = self.lock_path();
        let file = open_lock_file(&path)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(VmLock { _file: file }));
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(io_err(&path)(err))
        }
    }

    /// True while a process holds the VM lock. Probes with a shared lock, so that two
    /// concurrent probes (`list` and `delete`, say) never see each other as a running VM.
    pub fn is_locked(&self) -> Result<bool> {
        if !self.lock_path().exists() {
            return Ok(false);
        }
        Ok(self.try_flock(libc::LOCK_SH)?.is_none())
    }

    pub fn read_pid_file(&self) -> Option<PidFile> {
        read_json(&self.pid_path())
    }

    pub fn write_pid_file(&self, pid: &PidFile) -> Result<()> {
        write_json(&self.pid_path(), pid)
    }

    pub fn remove_pid_file(&self) {
        let _ = fs::remove_file(self.pid_path());
    }

    pub fn read_last_exit(&self) -> Option<ExitRecord> {
        read_json(&self.last_exit_path())
    }

    pub fn write_last_exit(&self, record: &ExitRecord) -> Result<()> {
        write_json(&self.last_exit_path(), record)
    }

    pub fn remove_last_exit(&self) -> Result<()> {
        let path = self.last_exit_path();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Running if the lock is held; otherwise stopped or crashed from the exit record.
    pub fn disk_state(&self) -> Result<DiskState> {
        if self.is_locked()? {
            return Ok(DiskState::Running { pid: self.read_pid_file() });
        }
        Ok(match self.read_last_exit() {
            Some(rec) if rec.clean => DiskState::Stopped,
            Some(rec) => DiskState::Crashed { error: rec.error },
            // A pid file with nobody holding the lock: the process died without a word.
            None if self.pid_path().exists() => DiskState::Crashed { error: None },
            None => DiskState::Stopped,
        })
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| io_err(path)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(io_err(path))
}

/// `PATH` or `PATH,readonly`. Anything else after the last comma is an error rather than
/// part of the path, so a typo (`,ro`, `,readonyl`) never silently makes a writable disk.
pub fn parse_disk(s: &str) -> std::result::Result<DiskEntry, String> {
    let (path, readonly) = match s.rsplit_once(',') {
        None => (s, false),
        Some((path, "readonly")) => (path, true),
        Some((_, opt)) => {
            return Err(format!("unknown disk option '{opt}' (expected PATH or PATH,readonly)"))
        }
    };
    if path.is_empty() {
        return Err("missing disk path (expected PATH or PATH,readonly)".into());
    }
    Ok(DiskEntry { path: PathBuf::from(path), readonly })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        assert_eq!(
            parse_disk("/vm/a.img").unwrap(),
            DiskEntry { path: "/vm/a.img".into(), readonly: false }
        );
        assert_eq!(
            parse_disk("a.img,readonly").unwrap(),
            DiskEntry { path: "a.img".into(), readonly: true }
        );
        assert_eq!(
            parse_disk("my,disk.img,readonly").unwrap(),
            DiskEntry { path: "my,disk.img".into(), readonly: true }
        );
    }

    #[test]
    fn bad_disk_options_are_rejected() {
        for s in ["", ",readonly", "a.img,ro", "a.img,", "a.img,readonly,"] {
            assert!(parse_disk(s).is_err(), "{s:?}");
        }
    }

    fn config(kernel: &Path) -> VmConfig {
        VmConfig::new(
            kernel.to_path_buf(),
            Some(PathBuf::from("/boot/initrd.img")),
            DEFAULT_CMDLINE.to_string(),
            vec![
                DiskEntry { path: PathBuf::from("/vm/root.img"), readonly: false },
                DiskEntry { path: PathBuf::from("/vm/iso.img"), readonly: true },
            ],
            2,
            1024,
        )
    }

    #[test]
    fn valid_names_are_accepted() {
        for name in ["a", "debian-12", "web_01.test", "A.b-C_9", &"x".repeat(64)] {
            assert!(validate_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn invalid_names_are_rejected() {
        let long = "x".repeat(65);
        for name in ["", ".hidden", "..", "a/b", "a b", "ü", "a\0", "-ok-but-\n", &long] {
            assert!(matches!(validate_name(name), Err(LibraryError::InvalidName(_))), "{name:?}");
        }
    }

    #[test]
    fn vm_toml_round_trips() {
        let c = config(Path::new("/boot/vmlinuz"));
        let text = c.to_toml();
        assert!(text.contains("[[disk]]"), "{text}");
        assert_eq!(VmConfig::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn minimal_vm_toml_gets_defaults() {
        let c = VmConfig::from_toml("kernel = \"/k\"\ncpus = 1\nmemory_mib = 64\n").unwrap();
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.format, 1);
        assert!(c.disks.is_empty() && c.initrd.is_none());
    }

    #[test]
    fn vm_toml_without_a_boot_key_boots_its_kernel() {
        let c = VmConfig::from_toml("kernel = \"/k\"\ncpus = 1\nmemory_mib = 64\n").unwrap();
        assert_eq!(c.boot, BootMode::Kernel);
        assert!(c.validate().is_ok());
        // Written back as it was: older hutch versions keep reading it.
        assert!(!c.to_toml().lines().any(|l| l.starts_with("boot")), "{}", c.to_toml());
    }

    #[test]
    fn the_iso_boots_first_until_the_first_disk_has_a_boot_loader() {
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("inst.iso");
        std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let mut c = config(Path::new(""));
        c.boot = BootMode::Bios;
        c.iso = Some(iso.clone());
        c.disks.clear();
        let order = |c: &VmConfig| -> Vec<(PathBuf, bool)> {
            c.to_machine_config().disks.into_iter().map(|d| (d.path, d.readonly)).collect()
        };
        assert_eq!(order(&c), vec![(iso.clone(), true)]);
        c.disks = vec![DiskEntry { path: disk.clone(), readonly: false }];
        assert_eq!(order(&c), vec![(iso.clone(), true), (disk.clone(), false)]);
        // The installer wrote a boot loader: the disk boots, the CD stays in.
        let mut mbr = vec![0u8; 1 << 20];
        mbr[..2].copy_from_slice(&[0xeb, 0x63]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        std::fs::write(&disk, mbr).unwrap();
        assert_eq!(order(&c), vec![(disk.clone(), false), (iso.clone(), true)]);
        let text = c.to_toml();
        assert_eq!(VmConfig::from_toml(&text).unwrap(), c);
        // A machine restored from a snapshot taken before that keeps the CD first.
        c.cd_first = Some(true);
        assert_eq!(order(&c), vec![(iso.clone(), true), (disk.clone(), false)]);
        assert!(!c.to_toml().contains("cd_first"), "a run-time choice, not vm.toml's");
        // Ejected from the running machine: its drive stays where it was, empty.
        c.iso = None;
        let empty = (PathBuf::new(), true);
        assert_eq!(order(&c), vec![empty.clone(), (disk.clone(), false)]);
        // Started with no CD: the empty drive comes last, and boots nothing.
        c.cd_first = None;
        assert!(!c.cd_is_first(), "no CD, nothing first");
        assert_eq!(order(&c), vec![(disk.clone(), false), empty]);
        assert!(c.to_machine_config().disks[1].is_empty_drive());
        // A kernel-boot VM has a drive only with an ISO.
        c.boot = BootMode::Kernel;
        assert_eq!(order(&c), vec![(disk.clone(), false)]);
        c.iso = Some(iso.clone());
        assert_eq!(order(&c), vec![(disk, false), (iso, true)]);
    }

    #[test]
    fn a_uefi_vm_toml_round_trips_without_a_kernel() {
        let mut c = config(Path::new(""));
        c.initrd = None;
        c.boot = BootMode::Uefi;
        c.validate().unwrap();
        let text = c.to_toml();
        assert!(text.contains("boot = \"uefi\""), "{text}");
        assert!(!text.contains("kernel"), "{text}");
        assert_eq!(VmConfig::from_toml(&text).unwrap(), c);
        assert!(VmConfig::from_toml("boot = \"bsd\"\ncpus = 1\nmemory_mib = 64\n").is_err());
        let bios = VmConfig::from_toml("boot = \"bios\"\ncpus = 1\nmemory_mib = 64\n").unwrap();
        assert_eq!(bios.boot, BootMode::Bios);
        bios.validate().unwrap();
    }

    #[test]
    fn a_kernel_vm_without_a_kernel_is_refused() {
        let c = VmConfig::from_toml("cpus = 1\nmemory_mib = 64\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("kernel"), "{err}");
    }

    #[test]
    fn vm_toml_from_before_networking_has_no_network_card() {
        let c = VmConfig::from_toml("kernel = \"/k\"\ncpus = 1\nmemory_mib = 64\n").unwrap();
        assert_eq!(c.net, NetMode::None);
        assert!(c.mac.is_none() && c.forwards.is_empty() && !c.isolate_from_host);
        assert_eq!(c.mtu, 1500, "the MTU its guest and snapshots were made with");
        assert!(!c.to_toml().contains("net"), "{}", c.to_toml());
        assert!(!c.to_toml().contains("mtu"), "{}", c.to_toml());
    }

    #[test]
    fn new_vms_get_user_networking_with_their_own_mac_and_keep_it() {
        let mut c = config(Path::new("/k"));
        assert_eq!(c.net, NetMode::User);
        assert_eq!(c.mtu, USER_NET_MTU);
        let mac = c.mac.clone().unwrap();
        assert_eq!(&mac[..9], "52:54:00:");
        assert!(parse_mac(&mac).is_ok());
        c.forwards = vec!["tcp:127.0.0.1:2222-:22".into()];
        c.isolate_from_host = true;
        let text = c.to_toml();
        assert!(text.contains("net = \"user\"") && text.contains(&mac), "{text}");
        assert_eq!(VmConfig::from_toml(&text).unwrap(), c);
        let macs: std::collections::HashSet<_> =
            (0..8).map(|_| config(Path::new("/k")).mac.unwrap()).collect();
        assert!(macs.len() > 1, "every VM got the same MAC: {macs:?}");
    }

    #[test]
    fn an_mtu_outside_what_virtio_net_and_slirp_take_is_rejected() {
        for (mtu, ok) in [(67, false), (68, true), (1500, true), (65520, true), (65535, false)] {
            let text = format!(
                "kernel = \"/k\"\ncpus = 1\nmemory_mib = 64\nnet = \"user\"\nmtu = {mtu}\n"
            );
            let c = VmConfig::from_toml(&text).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "mtu {mtu}");
        }
    }

    #[test]
    fn bad_macs_and_network_modes_are_rejected() {
        for bad in
            ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52-54-00-12-34-56", "zz:54:00:12:34:56"]
        {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert!(parse_mac("53:54:00:12:34:56").unwrap_err().to_string().contains("multicast"));
        let mut c = config(Path::new("/k"));
        c.mac = Some("nonsense".into());
        assert!(matches!(c.validate(), Err(LibraryError::InvalidConfig { what: "mac", .. })));
        assert!("bridge".parse::<NetMode>().is_err());
        let mut c = config(Path::new("/k"));
        c.forwards = vec!["tcp::2222-:22".into(), "tcp:127.0.0.1:2222-:80".into()];
        assert!(matches!(c.validate(), Err(LibraryError::InvalidConfig { what: "forwards", .. })));
        c.forwards = vec!["tcp:2222".into()];
        assert!(matches!(c.validate(), Err(LibraryError::InvalidConfig { what: "forwards", .. })));
        assert_eq!("user".parse::<NetMode>().unwrap(), NetMode::User);
    }

    #[test]
    fn out_of_range_numbers_are_rejected() {
        let mut c = config(Path::new("/k"));
        for (cpus, mem) in [(0, 512), (MAX_CPUS + 1, 512), (1, 0), (1, MAX_MEMORY_MIB + 1)] {
            c.cpus = cpus;
            c.memory_mib = mem;
            assert!(c.validate().is_err(), "{cpus} {mem}");
        }
        c.cpus = MAX_CPUS;
        c.memory_mib = 512;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn missing_kernel_is_reported_with_its_path() {
        let err = config(Path::new("/nonexistent/vmlinuz")).check_files().unwrap_err();
        assert!(matches!(&err, LibraryError::File { what: "kernel", path, .. }
            if path == Path::new("/nonexistent/vmlinuz")));
    }

    #[test]
    fn create_refuses_an_existing_name_and_delete_removes_the_vm() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let c = config(Path::new("/k"));
        lib.create("vm1", &c).unwrap();
        assert!(matches!(lib.create("vm1", &c), Err(LibraryError::Exists(_))));
        assert_eq!(lib.names().unwrap(), vec!["vm1"]);
        assert_eq!(lib.existing("vm1").unwrap().load_config().unwrap(), c);
        lib.delete("vm1").unwrap();
        assert!(lib.names().unwrap().is_empty());
        assert!(matches!(lib.delete("vm1"), Err(LibraryError::NotFound(_))));
        // Nothing left behind, not even the trash directory.
        assert_eq!(fs::read_dir(home.path().join("vms")).unwrap().count(), 0);
    }

    #[test]
    fn a_held_lock_means_running_and_blocks_delete() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let vm = lib.create("vm1", &config(Path::new("/k"))).unwrap();
        assert_eq!(vm.disk_state().unwrap(), DiskState::Stopped);
        let lock = vm.try_lock().unwrap().unwrap();
        assert!(matches!(vm.disk_state().unwrap(), DiskState::Running { pid: None }));
        assert!(matches!(lib.delete("vm1"), Err(LibraryError::Running(_))));
        drop(lock);
        assert_eq!(vm.disk_state().unwrap(), DiskState::Stopped);
    }

    #[test]
    fn stale_pid_file_without_exit_record_means_crashed() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let vm = lib.create("vm1", &config(Path::new("/k"))).unwrap();
        vm.write_pid_file(&PidFile { pid: 1, socket: PathBuf::from("/x"), started_at: 0 }).unwrap();
        assert_eq!(vm.disk_state().unwrap(), DiskState::Crashed { error: None });
        vm.write_last_exit(&ExitRecord::new(ExitKind::PowerOff, None)).unwrap();
        assert_eq!(vm.disk_state().unwrap(), DiskState::Stopped);
        vm.write_last_exit(&ExitRecord::new(ExitKind::Failed, Some("boom".into()))).unwrap();
        assert_eq!(vm.disk_state().unwrap(), DiskState::Crashed { error: Some("boom".into()) });
    }
}
