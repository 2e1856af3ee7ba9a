//! STUB for the GUI helper: the lead's real module replaces this file at merge. The
//! signatures are the real ones; each call blocks (talks to the VM process) so call them
//! from the GUI's worker thread, never the UI thread.
use anyhow::bail;

use crate::library::Library;
use crate::snapshots::{SnapshotInfo, SnapshotList};

/// Takes a live snapshot of running VM `name` (named `snapshot`, default "Snapshot N").
pub fn take(
    _library: &Library,
    _name: &str,
    _snapshot: Option<&str>,
) -> anyhow::Result<SnapshotInfo> {
    bail!("stub")
}

/// The VM's snapshots (oldest first, `parent` links make the tree; `current` is the one the
/// running state descends from). Cheap: reads a small JSON file.
pub fn list(_library: &Library, _name: &str) -> anyhow::Result<SnapshotList> {
    bail!("stub")
}

/// Restores snapshot `key` (id or name): a running VM is replaced (its process restarts into
/// the snapshot, same pid; the control socket and shared screen go away for a moment and come
/// back), a stopped VM is started from it. Returns the id once the VM runs again.
pub fn restore(_library: &Library, _name: &str, _key: &str) -> anyhow::Result<String> {
    bail!("stub")
}

/// Deletes snapshot `key`; the other snapshots keep their data.
pub fn delete(_library: &Library, _name: &str, _key: &str) -> anyhow::Result<SnapshotInfo> {
    bail!("stub")
}
