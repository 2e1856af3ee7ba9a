//! The service layer: what Hutch does, for both front ends. The CLI (`cli/`) and the GUI
//! (`gui/`) call these and never each other; only this layer (and the VM process) talks to
//! VM processes and the machine.
//!
//! ```text
//!  cli ─┐                  ┌─ library (vm.toml, lock, pid/exit records)
//!       ├─▶ service::vm ───┼─ control::client ─▶ VM process (vm_process)
//!  gui ─┘    snapshot      ├─ snapshots (tree, layers)
//!            import, disk  └─ disk (formats, convert)
//! ```

pub mod disk;
pub mod import;
pub mod net;
pub mod snapshot;
pub mod vm;

/// A library in a fresh directory with one stopped kernel VM, `vm`, for the service tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
pub(crate) fn library_with_vm() -> (tempfile::TempDir, crate::library::Library) {
    let home = tempfile::tempdir().unwrap();
    let lib = crate::library::Library::at(home.path().to_path_buf());
    let config = crate::library::VmConfig::new("/k".into(), None, "c".into(), Vec::new(), 1, 128);
    lib.create("vm", &config).unwrap();
    (home, lib)
}
