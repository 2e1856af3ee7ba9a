//! STUB for the GUI helper: the lead's real module replaces this file at merge.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One snapshot as the CLI, GUI and control protocol show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// Unix time it was taken.
    pub created: u64,
    /// The snapshot this one was taken after (its parent in the tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The thumbnail PNG, when the VM had a screen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<PathBuf>,
    /// Bytes the snapshot's state file takes on disk.
    #[serde(default)]
    pub disk_bytes: u64,
}

/// A VM's snapshots, oldest first, and the one the VM's current state descends from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}
