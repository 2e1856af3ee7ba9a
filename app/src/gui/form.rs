//! The create / edit-settings form: text fields, and their validation into a [`VmConfig`]
//! with one message per bad field.

use std::path::PathBuf;

use crate::library::parse_disk;
use crate::library::{
    self, BootMode, NetMode, VmConfig, DEFAULT_CMDLINE, MAX_CPUS, MAX_MEMORY_MIB,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Name,
    /// The firmware (UEFI, BIOS) or the kernel.
    Boot,
    Iso,
    NewDisk,
    Kernel,
    Initrd,
    Disks,
    Cpus,
    Memory,
    Cmdline,
    Forwards,
}

/// The form's text, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmForm {
    pub name: String,
    /// Firmware (UEFI or BIOS: the VM boots its own OS, from the ISO or its disk) or a
    /// kernel the VMM loads.
    pub boot: BootMode,
    /// The installer ISO in the CD drive (firmware VMs).
    pub iso: String,
    /// A new blank disk to install on, e.g. `20G` (creating only; empty: none).
    pub new_disk: String,
    pub kernel: String,
    pub initrd: String,
    /// One disk per line: `PATH` or `PATH,readonly`.
    pub disks: String,
    pub cpus: String,
    pub memory_mib: String,
    pub cmdline: String,
    /// A network card behind user-mode NAT.
    pub network: bool,
    /// The card's MAC, kept across edits (empty: a new one).
    pub mac: String,
    /// One forward per line: `tcp:127.0.0.1:2222-:22`.
    pub forwards: String,
    pub isolate_from_host: bool,
    /// Not edited here: kept, since the guest and its snapshots were made with it.
    pub mtu: u16,
}

impl Default for VmForm {
    fn default() -> VmForm {
        // A new VM installs from an ISO first (what users bring); kernel boot is the
        // second choice in the dialog.
        VmForm {
            name: String::new(),
            boot: BootMode::Uefi,
            iso: String::new(),
            new_disk: DEFAULT_NEW_DISK.into(),
            kernel: String::new(),
            initrd: String::new(),
            disks: String::new(),
            cpus: "2".into(),
            memory_mib: "2048".into(),
            cmdline: DEFAULT_CMDLINE.into(),
            network: true,
            mac: String::new(),
            forwards: String::new(),
            isolate_from_host: false,
            mtu: library::USER_NET_MTU,
        }
    }
}

/// The size of the disk a VM installed from an ISO gets, as the form first shows it.
pub const DEFAULT_NEW_DISK: &str = "20G";

/// Problems, one per field, in form order.
pub type FormErrors = Vec<(Field, String)>;

impl VmForm {
    /// The form of an existing VM's settings.
    pub fn from_config(name: &str, c: &VmConfig) -> VmForm {
        let disks = c
            .disks
            .iter()
            .map(|d| {
                let p = d.path.display();
                if d.readonly {
                    format!("{p},readonly")
                } else {
                    p.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        VmForm {
            name: name.into(),
            boot: c.boot,
            iso: c.iso.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            new_disk: String::new(),
            kernel: c.kernel.display().to_string(),
            initrd: c.initrd.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            disks,
            cpus: c.cpus.to_string(),
            memory_mib: c.memory_mib.to_string(),
            cmdline: c.cmdline.clone(),
            network: c.net == NetMode::User,
            mac: c.mac.clone().unwrap_or_default(),
            forwards: c.forwards.join("\n"),
            isolate_from_host: c.isolate_from_host,
            mtu: c.mtu,
        }
    }

    /// Checks every field; `existing` are the library's names (a new name must be free;
    /// when editing, `existing` should not hold the VM's own name). Files must exist and
    /// open as the VM will open them; relative paths are taken from the current directory.
    pub fn validate(&self, existing: &[String]) -> Result<FormOutcome, FormErrors> {
        let mut errors = FormErrors::new();
        let name = self.name.trim();
        if let Err(e) = library::validate_name(name) {
            errors.push((Field::Name, e.to_string()));
        } else if existing.iter().any(|n| n == name) {
            errors.push((Field::Name, format!("A VM named '{name}' already exists")));
        }
        let firmware = self.boot != BootMode::Kernel;
        let kernel = if firmware { "" } else { self.kernel.trim() };
        if !firmware && kernel.is_empty() {
            errors.push((Field::Kernel, "A kernel is required".into()));
        }
        let iso = if firmware { self.iso.trim() } else { "" };
        let new_disk = match self.new_disk.trim() {
            _ if !firmware => None,
            "" => None,
            size => match crate::service::disk::parse_new_size(size) {
                Ok(0) => {
                    errors.push((Field::NewDisk, "The new disk needs a size above 0".into()));
                    None
                }
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    errors.push((Field::NewDisk, format!("{size}: {e}")));
                    None
                }
            },
        };
        // A new disk means an install: it needs the installer.
        if firmware && !self.new_disk.trim().is_empty() && iso.is_empty() {
            errors.push((Field::Iso, "An ISO to install from is required".into()));
        }
        let initrd = if firmware { "" } else { self.initrd.trim() };
        let mut disks = Vec::new();
        for line in self.disks.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match parse_disk(line) {
                Ok(d) => disks.push(d),
                Err(e) => errors.push((Field::Disks, format!("{line}: {e}"))),
            }
        }
        let cpus = match self.cpus.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_CPUS).contains(&n) => n,
            _ => {
                errors.push((Field::Cpus, format!("CPUs must be a number from 1 to {MAX_CPUS}")));
                0
            }
        };
        let memory = match self.memory_mib.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_MEMORY_MIB).contains(&n) => n,
            _ => {
                errors.push((
                    Field::Memory,
                    format!("Memory must be a number of MiB from 1 to {MAX_MEMORY_MIB}"),
                ));
                0
            }
        };
        if self.cmdline.contains('\0') {
            errors.push((Field::Cmdline, "The command line contains a NUL byte".into()));
        }
        let mut forwards: Vec<net::slirp::Forward> = Vec::new();
        for line in self.forwards.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.parse::<net::slirp::Forward>() {
                Ok(f) if forwards.iter().any(|o| o.same_host_socket(&f)) => errors
                    .push((Field::Forwards, format!("{line}: {} is forwarded twice", f.host()))),
                Ok(f) => forwards.push(f),
                Err(e) => errors.push((Field::Forwards, format!("{line}: {e}"))),
            }
        }
        if !self.network && !forwards.is_empty() {
            errors.push((Field::Forwards, "Port forwards need the network card".into()));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let cmdline = if firmware { String::new() } else { self.cmdline.trim().to_string() };
        let mut config = VmConfig::new(
            PathBuf::from(kernel),
            (!initrd.is_empty()).then(|| PathBuf::from(initrd)),
            cmdline,
            disks,
            cpus,
            memory,
        );
        config.boot = self.boot;
        config.iso = (!iso.is_empty()).then(|| PathBuf::from(iso));
        if self.network {
            if !self.mac.trim().is_empty() {
                config.mac = Some(self.mac.trim().to_string());
            }
        } else {
            config.net = NetMode::None;
            config.mac = None;
        }
        config.forwards = forwards.iter().map(ToString::to_string).collect();
        config.isolate_from_host = self.network && self.isolate_from_host;
        config.mtu = self.mtu;
        if let Err(e) = config.make_paths_absolute() {
            return Err(vec![(Field::Kernel, e.to_string())]);
        }
        // The file checks name the file; put the message on its field.
        if let Err(e) = config.check_files() {
            let field = match &e {
                library::LibraryError::File { what: "initrd", .. } => Field::Initrd,
                library::LibraryError::File { what: "disk", .. } => Field::Disks,
                library::LibraryError::File { what: "ISO", .. } => Field::Iso,
                _ if firmware => Field::Boot,
                _ => Field::Kernel,
            };
            return Err(vec![(field, format!("{:#}", anyhow::Error::from(e)))]);
        }
        Ok(FormOutcome { config, new_disk })
    }
}

/// A checked form: the configuration, and the size of a new blank disk to make first.
#[derive(Debug)]
pub struct FormOutcome {
    pub config: VmConfig,
    pub new_disk: Option<u64>,
}

/// The message for `field`, if it has one.
pub fn error_for(errors: &FormErrors, field: Field) -> Option<&str> {
    errors.iter().find(|(f, _)| *f == field).map(|(_, m)| m.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    fn form_with_files(dir: &std::path::Path) -> VmForm {
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let disk = dir.join("root.img");
        std::fs::write(&disk, b"d").unwrap();
        VmForm {
            name: "web".into(),
            boot: BootMode::Kernel,
            kernel: kernel.display().to_string(),
            disks: format!("{}\n\n{},readonly\n", disk.display(), disk.display()),
            cpus: "2".into(),
            memory_mib: "1024".into(),
            ..VmForm::default()
        }
    }

    #[test]
    fn a_complete_form_becomes_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let c = form_with_files(dir.path()).validate(&["other".into()]).unwrap().config;
        assert_eq!((c.cpus, c.memory_mib), (2, 1024));
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].readonly && !c.disks[0].readonly);
        assert!(c.initrd.is_none());
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn a_new_vm_installs_from_an_iso_onto_a_new_disk_without_a_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("debian.iso");
        std::fs::write(&iso, [0u8; 2048]).unwrap();
        let form = VmForm {
            name: "deb".into(),
            iso: iso.display().to_string(),
            kernel: "ignored: firmware boots the ISO".into(),
            ..VmForm::default()
        };
        assert_eq!(form.boot, BootMode::Uefi, "a new VM installs from an ISO by default");
        match form.validate(&[]) {
            Ok(FormOutcome { config, new_disk }) => {
                assert_eq!(config.boot, BootMode::Uefi);
                assert_eq!(config.iso.as_deref(), Some(iso.as_path()));
                assert_eq!(config.kernel, PathBuf::new());
                assert_eq!(new_disk, Some(20 << 30));
            }
            // A host without OVMF: the message goes on the firmware's field, naming the package.
            Err(errors) => {
                assert!(crate::firmware::find_uefi_in_env().is_err(), "{errors:?}");
                assert!(error_for(&errors, Field::Boot).is_some_and(|m| m.contains("ovmf")));
            }
        }
    }

    #[test]
    fn installing_needs_an_iso_and_a_disk_size_it_can_read() {
        let form = VmForm { name: "deb".into(), new_disk: "lots".into(), ..VmForm::default() };
        let errors = form.validate(&[]).unwrap_err();
        assert!(error_for(&errors, Field::Iso).is_some_and(|m| m.contains("ISO")), "{errors:?}");
        assert!(error_for(&errors, Field::NewDisk).is_some_and(|m| m.contains("lots")));
        assert!(error_for(&errors, Field::Kernel).is_none(), "no kernel is asked for");
    }

    #[test]
    fn every_bad_field_gets_its_own_message() {
        let form = VmForm {
            name: ".hidden".into(),
            boot: BootMode::Kernel,
            kernel: " ".into(),
            disks: "a.img,ro".into(),
            cpus: "0".into(),
            memory_mib: "lots".into(),
            cmdline: "a\0b".into(),
            ..VmForm::default()
        };
        let errors = form.validate(&[]).unwrap_err();
        for field in
            [Field::Name, Field::Kernel, Field::Disks, Field::Cpus, Field::Memory, Field::Cmdline]
        {
            assert!(error_for(&errors, field).is_some(), "{field:?}: {errors:?}");
        }
        assert!(error_for(&errors, Field::Disks).unwrap().contains("ro"));
    }

    #[test]
    fn a_taken_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let errors = form_with_files(dir.path()).validate(&["web".into()]).unwrap_err();
        assert!(error_for(&errors, Field::Name).unwrap().contains("already exists"));
    }

    #[test]
    fn a_missing_file_is_reported_on_its_field_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut form = form_with_files(dir.path());
        form.initrd = "/nonexistent/initrd.img".into();
        let errors = form.validate(&[]).unwrap_err();
        let msg = error_for(&errors, Field::Initrd).unwrap();
        assert!(msg.contains("/nonexistent/initrd.img"), "{msg}");
    }

    #[test]
    fn bad_or_doubled_forwards_are_reported_on_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut form = form_with_files(dir.path());
        form.forwards = "tcp:127.0.0.1:2222-:22\ntcp::2222-:80\nsctp::1-:2".into();
        let errors = form.validate(&[]).unwrap_err();
        let msg = error_for(&errors, Field::Forwards).unwrap();
        assert!(msg.contains("twice"), "{errors:?}");
        assert_eq!(errors.iter().filter(|(f, _)| *f == Field::Forwards).count(), 2, "{errors:?}");
        form.forwards = "tcp::2222-:22".into();
        form.network = false;
        assert!(error_for(&form.validate(&[]).unwrap_err(), Field::Forwards).is_some());
    }

    #[test]
    fn a_vm_without_network_keeps_no_mac() {
        let dir = tempfile::tempdir().unwrap();
        let mut form = form_with_files(dir.path());
        form.network = false;
        let c = form.validate(&[]).unwrap().config;
        assert_eq!((c.net, c.mac), (NetMode::None, None));
    }

    #[test]
    fn settings_round_trip_through_the_form() {
        let dir = tempfile::tempdir().unwrap();
        let mut form = form_with_files(dir.path());
        form.forwards = "tcp::2222-:22\nudp:127.0.0.1:5353-:53".into();
        form.isolate_from_host = true;
        let c = form.validate(&[]).unwrap().config;
        assert_eq!(c.forwards, ["tcp:127.0.0.1:2222-:22", "udp:127.0.0.1:5353-:53"]);
        // The MAC made at creation stays: the guest's network configuration depends on it.
        let again = VmForm::from_config("web", &c).validate(&[]).unwrap().config;
        assert_eq!(again, c);
        // So does the MTU of a VM made before the larger default: its snapshots need it.
        let old = VmConfig { mtu: 1500, ..c };
        assert_eq!(VmForm::from_config("web", &old).validate(&[]).unwrap().config.mtu, 1500);
    }
}
