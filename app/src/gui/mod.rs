//! The Hutch GUI (`hutch` with no arguments, or `hutch gui`): a library view of the VMs
//! and a view of one VM's screen.
//!
//! ```text
//!  winit loop (window.rs) ─▶ app.on_window_event ─┬─ captured keys/pointer ─▶ input ─▶ vm_link ─▶ control.sock
//!                          └▶ egui ─▶ app.ui ──────┴─ jobs (start/stop/...) ─▶ worker threads ─▶ library, control
//!  worker poller: states every second, thumbnails ─▶ channel ─▶ app
//!  screen watcher: display.shm seq ─▶ dirty rects ─▶ mailbox ─▶ texture (set_partial)
//! ```
//! - [`model`]: VM states for the GUI; [`capacity`]: host RAM/CPUs vs the VMs; [`form`]:
//!   the create/edit form; [`import_sheet`]: importing dropped disk images; [`demo`]: the first-run demo VM; [`persist`]: `gui-state.json`;
//! - [`input`]: key routing and host shortcuts; [`screen`]: the guest screen; [`vm_link`]:
//!   input and size to the VM; [`procstat`]: CPU use; [`worker`]: everything that blocks;
//! - [`snapshot_panel`]: a VM's snapshot tree and its buttons; [`toast`]: transient notes;
//! - `views/`: the library, VM and dialog views drawn over [`app::GuiApp`]'s state.

pub mod app;
pub mod capacity;
pub mod demo;
pub mod form;
pub mod import_sheet;
pub mod input;
pub mod model;
pub mod net_panel;
pub mod persist;
pub mod procstat;
pub mod screen;
pub mod snapshot_panel;
pub mod toast;
mod views;
pub mod vm_link;
pub mod window;
pub mod worker;

use crate::library::Library;

/// Opens the GUI on `library` and returns when its window is closed.
pub fn run(library: Library) -> anyhow::Result<()> {
    window::run(library)
}
