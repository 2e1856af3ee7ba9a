//! Finding the host's firmware (Debian's `ovmf` and `seabios` packages, never bundled) and a
//! VM's own copy of its UEFI variable store.
//!
//! `--firmware uefi` and `boot = "uefi"` look in `$HUTCH_FIRMWARE_DIR` when it is set (and
//! nowhere else, so tests and unusual installs choose exactly), else in `/usr/share/OVMF`,
//! for a CODE image and the VARS template that goes with it: the 4 MiB pair first (the only
//! 4 MiB build that needs no SMM), then the 2 MiB one. `--firmware bios` and `boot = "bios"`
//! look for SeaBIOS's `bios.bin` the same way (in `/usr/share/seabios`): the 128 KiB build,
//! which needs no SMM (FIRMWARE.md §3.4). A BIOS VM with a screen also needs the VGA BIOS
//! for its bochs-display, `vgabios-bochs-display.bin` from the same package and directory
//! (FIRMWARE.md §3.8); OVMF drives that display without one.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Where Debian's `ovmf` package puts its images.
pub const DEBIAN_OVMF_DIR: &str = "/usr/share/OVMF";
/// The Debian package that holds them, for the error that says what to install.
pub const DEBIAN_OVMF_PACKAGE: &str = "ovmf";
/// CODE and VARS file names, best first.
pub const UEFI_PAIRS: [(&str, &str); 2] =
    [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")];
/// The keyword `--firmware` takes instead of a path.
pub const UEFI_KEYWORD: &str = "uefi";
/// Where Debian's `seabios` package puts its images, the package, and the image.
pub const DEBIAN_SEABIOS_DIR: &str = "/usr/share/seabios";
pub const DEBIAN_SEABIOS_PACKAGE: &str = "seabios";
pub const BIOS_IMAGE: &str = "bios.bin";
/// SeaBIOS's VGA BIOS for the bochs-display (VBE modes and text mode drawn into its
/// framebuffer).
pub const VGA_BIOS_IMAGE: &str = "vgabios-bochs-display.bin";
/// The keyword `--firmware` takes for SeaBIOS.
pub const BIOS_KEYWORD: &str = "bios";

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "No UEFI firmware found: install Debian's '{DEBIAN_OVMF_PACKAGE}' package (or set \
         HUTCH_FIRMWARE_DIR to a directory holding a CODE and VARS pair); searched {}",
        list(searched)
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error(
        "No BIOS firmware found: install Debian's '{DEBIAN_SEABIOS_PACKAGE}' package (or set \
         HUTCH_FIRMWARE_DIR to a directory holding {BIOS_IMAGE}); searched {}",
        path.display()
    )]
    BiosNotFound { path: PathBuf },
    #[error(
        "No VGA BIOS for the screen of a BIOS VM found: install Debian's \
         '{DEBIAN_SEABIOS_PACKAGE}' package (or set HUTCH_FIRMWARE_DIR to a directory holding \
         {VGA_BIOS_IMAGE}), or turn the VM's display off; searched {}",
        path.display()
    )]
    VgaBiosNotFound { path: PathBuf },
    #[error("Cannot make the UEFI variable store {path} from {template}")]
    Nvram {
        path: PathBuf,
        template: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// A firmware's code and the pristine variable store a new VM's store is copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFirmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Finds the UEFI firmware; `var` reads the environment (`HUTCH_FIRMWARE_DIR`).
pub fn find_uefi(var: impl Fn(&str) -> Option<OsString>) -> Result<UefiFirmware, FirmwareError> {
    let dir = firmware_dir(var, DEBIAN_OVMF_DIR);
    let mut searched = Vec::new();
    for (code, vars) in UEFI_PAIRS {
        let (code, vars) = (dir.join(code), dir.join(vars));
        if code.is_file() && vars.is_file() {
            return Ok(UefiFirmware { code, vars_template: vars });
        }
        searched.push(code);
        searched.push(vars);
    }
    Err(FirmwareError::NotFound { searched })
}

/// Finds SeaBIOS; `var` reads the environment (`HUTCH_FIRMWARE_DIR`).
pub fn find_bios(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, FirmwareError> {
    find_seabios_file(var, BIOS_IMAGE).map_err(|path| FirmwareError::BiosNotFound { path })
}

/// [`find_bios`] with this process's environment.
pub fn find_bios_in_env() -> Result<PathBuf, FirmwareError> {
    find_bios(|k| std::env::var_os(k))
}

/// Finds SeaBIOS's VGA BIOS for the bochs-display where [`find_bios`] finds SeaBIOS.
pub fn find_vga_bios(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, FirmwareError> {
    find_seabios_file(var, VGA_BIOS_IMAGE).map_err(|path| FirmwareError::VgaBiosNotFound { path })
}

/// `name` in SeaBIOS's directory if it is a file there, else the path searched.
fn find_seabios_file(
    var: impl Fn(&str) -> Option<OsString>,
    name: &str,
) -> Result<PathBuf, PathBuf> {
    let path = firmware_dir(var, DEBIAN_SEABIOS_DIR).join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(path)
    }
}

/// [`find_vga_bios`] with this process's environment.
pub fn find_vga_bios_in_env() -> Result<PathBuf, FirmwareError> {
    find_vga_bios(|k| std::env::var_os(k))
}

/// `$HUTCH_FIRMWARE_DIR` if set and not empty, else `default`.
fn firmware_dir(var: impl Fn(&str) -> Option<OsString>, default: &str) -> PathBuf {
    var("HUTCH_FIRMWARE_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| default.into(), PathBuf::from)
}

/// [`find_uefi`] with this process's environment.
pub fn find_uefi_in_env() -> Result<UefiFirmware, FirmwareError> {
    find_uefi(|k| std::env::var_os(k))
}

/// Makes `path` a copy of `template` unless it exists already (the guest's variables live
/// there from then on). The copy appears whole or not at all: a temp file, fsynced, renamed.
/// Returns whether it was made now.
pub fn ensure_nvram(path: &Path, template: &Path) -> Result<bool, FirmwareError> {
    let fail = |source| FirmwareError::Nvram {
        path: path.to_path_buf(),
        template: template.to_path_buf(),
        source,
    };
    match path.try_exists() {
        Ok(true) => return Ok(false),
        Ok(false) => {}
        Err(e) => return Err(fail(e)),
    }
    let mut source = File::open(template).map_err(fail)?;
    crate::fsutil::write_atomic_with(path, |file| io::copy(&mut source, file).map(drop))
        .map_err(fail)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

    use super::*;

    fn env_with_dir(dir: &Path) -> impl Fn(&str) -> Option<OsString> + '_ {
        move |k| (k == "HUTCH_FIRMWARE_DIR").then(|| dir.as_os_str().to_owned())
    }

    #[test]
    fn the_4m_pair_is_preferred_over_the_2m_one() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"] {
            std::fs::write(dir.path().join(name), b"fd").unwrap();
        }
        let found = find_uefi(env_with_dir(dir.path())).unwrap();
        assert_eq!(found.code, dir.path().join("OVMF_CODE_4M.fd"));
        assert_eq!(found.vars_template, dir.path().join("OVMF_VARS_4M.fd"));
    }

    #[test]
    fn the_2m_pair_is_found_when_there_is_no_4m_one() {
        let dir = tempfile::tempdir().unwrap();
        // A 4M CODE without its VARS is no pair.
        for name in ["OVMF_CODE_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"] {
            std::fs::write(dir.path().join(name), b"fd").unwrap();
        }
        let found = find_uefi(env_with_dir(dir.path())).unwrap();
        assert_eq!(found.code, dir.path().join("OVMF_CODE.fd"));
        assert_eq!(found.vars_template, dir.path().join("OVMF_VARS.fd"));
    }

    #[test]
    fn missing_firmware_names_the_package_and_every_path_searched() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_uefi(env_with_dir(dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("'ovmf' package"), "{text}");
        for name in ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"] {
            let path = dir.path().join(name);
            assert!(text.contains(&path.display().to_string()), "{name} not in: {text}");
        }
    }

    #[test]
    fn without_the_override_or_with_it_empty_debians_directory_is_searched() {
        let unset = |_: &str| None;
        let empty = |_: &str| Some(OsString::new());
        for result in [find_uefi(unset), find_uefi(empty)] {
            match result {
                Ok(found) => assert!(found.code.starts_with(DEBIAN_OVMF_DIR), "{found:?}"),
                Err(FirmwareError::NotFound { searched }) => {
                    assert_eq!(searched.len(), 4);
                    assert!(searched.iter().all(|p| p.starts_with(DEBIAN_OVMF_DIR)));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn seabios_is_found_in_the_override_and_its_absence_names_the_package_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let text = find_bios(env_with_dir(dir.path())).unwrap_err().to_string();
        assert!(text.contains("'seabios' package"), "{text}");
        assert!(text.contains(&dir.path().join("bios.bin").display().to_string()), "{text}");
        std::fs::write(dir.path().join("bios.bin"), b"rom").unwrap();
        assert_eq!(find_bios(env_with_dir(dir.path())).unwrap(), dir.path().join("bios.bin"));
        match find_bios(|_| None) {
            Ok(found) => assert!(found.starts_with(DEBIAN_SEABIOS_DIR), "{found:?}"),
            Err(FirmwareError::BiosNotFound { path }) => {
                assert_eq!(path, Path::new(DEBIAN_SEABIOS_DIR).join("bios.bin"));
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_vga_bios_is_found_beside_seabios_and_its_absence_names_the_package_and_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bios.bin"), b"rom").unwrap();
        let text = find_vga_bios(env_with_dir(dir.path())).unwrap_err().to_string();
        assert!(text.contains("'seabios' package"), "{text}");
        let path = dir.path().join("vgabios-bochs-display.bin");
        assert!(text.contains(&path.display().to_string()), "{text}");
        std::fs::write(&path, b"vga").unwrap();
        assert_eq!(find_vga_bios(env_with_dir(dir.path())).unwrap(), path);
        match find_vga_bios(|_| None) {
            Ok(found) => assert!(found.starts_with(DEBIAN_SEABIOS_DIR), "{found:?}"),
            Err(FirmwareError::VgaBiosNotFound { path }) => {
                assert_eq!(path, Path::new(DEBIAN_SEABIOS_DIR).join(VGA_BIOS_IMAGE));
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_nvram_is_copied_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("OVMF_VARS_4M.fd");
        std::fs::write(&template, b"pristine").unwrap();
        let nvram = dir.path().join("vm").join("vars.fd");
        std::fs::create_dir(nvram.parent().unwrap()).unwrap();
        assert!(ensure_nvram(&nvram, &template).unwrap());
        assert_eq!(std::fs::read(&nvram).unwrap(), b"pristine");
        // The guest's writes survive the next start.
        std::fs::write(&nvram, b"guest wrote").unwrap();
        assert!(!ensure_nvram(&nvram, &template).unwrap());
        assert_eq!(std::fs::read(&nvram).unwrap(), b"guest wrote");
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(nvram.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_missing_template_is_an_error_naming_both_files_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("OVMF_VARS_4M.fd");
        let nvram = dir.path().join("vars.fd");
        let text =
            format!("{:#}", anyhow::Error::new(ensure_nvram(&nvram, &template).unwrap_err()));
        assert!(text.contains(&nvram.display().to_string()), "{text}");
        assert!(text.contains(&template.display().to_string()), "{text}");
        assert!(!nvram.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
