//! A VM's snapshots, for the CLI and the GUI: a running VM is asked through its control
//! socket (its process owns the machine and the VM lock); a stopped VM's snapshots are
//! handled here under the VM lock.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::control::client::ControlClient;
use crate::library::{DiskState, Library, VmDir};
use crate::snapshots::{self, SnapshotInfo, SnapshotList};

/// The running VM's control connection, or None when it is stopped.
fn connect(vm: &VmDir) -> anyhow::Result<Option<ControlClient>> {
    match vm.disk_state()? {
        DiskState::Running { pid: Some(p) } => Ok(Some(
            ControlClient::connect(&p.socket)
                .with_context(|| format!("Cannot reach VM '{}'", vm.name()))?,
        )),
        DiskState::Running { pid: None } => bail!("VM '{}' is still starting", vm.name()),
        _ => Ok(None),
    }
}

fn refused(e: crate::control::client::ControlClientError) -> anyhow::Error {
    anyhow!("{e}")
}

pub fn take(library: &Library, name: &str, snapshot: Option<&str>) -> anyhow::Result<SnapshotInfo> {
    let vm = library.existing(name)?;
    if let Some(n) = snapshot {
        snapshots::validate_name(n)?;
    }
    let mut client = connect(&vm)?
        .ok_or_else(|| anyhow!("VM '{name}' is not running; start it to take a snapshot"))?;
    client.snapshot_take(snapshot.map(str::to_string)).map_err(refused)
}

pub fn list(library: &Library, name: &str) -> anyhow::Result<SnapshotList> {
    snapshots::list(&library.existing(name)?)
}

/// How long a restore may take to bring the VM back.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Restores snapshot `key`; returns its id once the VM runs from it.
pub fn restore(library: &Library, name: &str, key: &str) -> anyhow::Result<String> {
    let vm = library.existing(name)?;
    // Checked first, in this process: a bad snapshot changes nothing.
    let id = snapshots::check_restore(&vm, key)
        .with_context(|| format!("Cannot restore snapshot '{key}' of VM '{name}'"))?;
    let Some(mut client) = connect(&vm)? else {
        super::vm::spawn(library, name, Some(&id))?;
        return Ok(id);
    };
    let before = client.status().map_err(refused)?.instance;
    client.snapshot_restore(id.clone()).map_err(refused)?;
    drop(client);
    // The VM process restarts itself into the snapshot: wait for the new instance.
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        if let DiskState::Running { pid: Some(p) } = vm.disk_state()? {
            if let Ok(status) = super::vm::probe(&p.socket, Duration::from_secs(2)) {
                if status.instance != before {
                    return Ok(id);
                }
            }
        }
        if let Some(exit) = vm.read_last_exit().filter(|e| e.error.is_some()) {
            if !matches!(vm.disk_state()?, DiskState::Running { .. }) {
                bail!(
                    "VM '{name}' could not restore snapshot {id}: {}",
                    exit.error.unwrap_or_default()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "VM '{name}' did not come back from snapshot {id} within {} s",
                RESTORE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn delete(library: &Library, name: &str, key: &str) -> anyhow::Result<SnapshotInfo> {
    let vm = library.existing(name)?;
    if let Some(mut client) = connect(&vm)? {
        let info = snapshots::find(&vm, key)?;
        client.snapshot_delete(info.id.clone()).map_err(refused)?;
        return Ok(info);
    }
    let _lock = vm
        .try_lock()?
        .ok_or_else(|| anyhow!("VM '{name}' is busy (starting or being changed); try again"))?;
    snapshots::delete(&vm, key, None)
}
