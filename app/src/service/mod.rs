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
