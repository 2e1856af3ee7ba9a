//! The first-run demo VM: the guest `tests/guest/build.sh` builds (a Debian kernel and a
//! busybox initramfs), looked up in a few candidate directories.

use std::path::{Path, PathBuf};

use crate::library::VmConfig;

pub const DEMO_NAME: &str = "Demo-Linux";
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initramfs.cpio.gz";
const CMDLINE: &str = "console=ttyS0 quiet hutch.actions=cpus,mem,shell";

/// The demo guest's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The first candidate directory holding both the kernel and the initramfs.
pub fn find_demo(candidates: &[PathBuf]) -> Option<DemoGuest> {
    candidates.iter().find_map(|dir| {
        let kernel = dir.join(KERNEL);
        let initrd = dir.join(INITRD);
        (kernel.is_file() && initrd.is_file()).then_some(DemoGuest { kernel, initrd })
    })
}

/// Where a demo guest may be: `$HUTCH_DEMO_DIR`, `<exe dir>/../share/hutch/demo` (an
/// installed package), the source tree's `build/guest` (a developer build).
pub fn default_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("HUTCH_DEMO_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(bin) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        dirs.push(bin.join("../share/hutch/demo"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"));
    dirs
}

impl DemoGuest {
    /// The demo VM's settings (as `tools/demo.sh` creates it).
    pub fn config(&self) -> VmConfig {
        VmConfig::new(
            self.kernel.clone(),
            Some(self.initrd.clone()),
            CMDLINE.into(),
            Vec::new(),
            2,
            512,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn the_first_directory_with_both_files_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let (only_kernel, full, also_full) =
            (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        for d in [&only_kernel, &full, &also_full] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join(KERNEL), b"k").unwrap();
        }
        for d in [&full, &also_full] {
            std::fs::write(d.join(INITRD), b"i").unwrap();
        }
        let missing = tmp.path().join("missing");
        let found = find_demo(&[missing, only_kernel, full.clone(), also_full]).unwrap();
        assert_eq!(found.kernel, full.join(KERNEL));
        assert_eq!(found.initrd, full.join(INITRD));
        let c = found.config();
        assert!(c.validate().is_ok());
        assert_eq!(c.initrd.as_deref(), Some(full.join(INITRD).as_path()));
    }

    #[test]
    fn no_demo_without_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(find_demo(&[tmp.path().to_path_buf()]), None);
        assert_eq!(find_demo(&[]), None);
    }

    #[test]
    fn the_demo_name_is_a_valid_vm_name() {
        assert!(crate::library::validate_name(DEMO_NAME).is_ok());
    }
}
