//! `hutch snapshot take|list|restore|delete`, also used by the GUI: a running VM is asked
//! through its control socket (its process owns the machine and the VM lock); a stopped VM's
//! snapshots are handled here under the VM lock.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;

use crate::control::client::ControlClient;
use crate::control::protocol::{Request, Response};
use crate::library::{DiskState, Library, VmDir};
use crate::snapshots::{self, SnapshotInfo, SnapshotList};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running VM (memory, CPUs, devices, disks) as a snapshot; it keeps running.
    Take {
        name: String,
        /// The snapshot's name (default: "Snapshot N").
        snapshot: Option<String>,
    },
    /// List a VM's snapshots as a tree.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Bring a VM back to a snapshot (a running VM is replaced; a stopped one starts).
    Restore { name: String, snapshot: String },
    /// Delete a snapshot; the others keep all their data.
    Delete { name: String, snapshot: String },
}

pub fn run(library: &Library, cmd: SnapshotCommand) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        SnapshotCommand::Take { name, snapshot } => {
            let started = Instant::now();
            let info = take(library, &name, snapshot.as_deref())?;
            println!(
                "Took snapshot '{}' ({}) of VM '{name}' in {} ms",
                info.name,
                info.id,
                started.elapsed().as_millis()
            );
        }
        SnapshotCommand::List { name, json } => {
            let list = list(library, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_tree(&list);
            }
        }
        SnapshotCommand::Restore { name, snapshot } => {
            let started = Instant::now();
            let id = restore(library, &name, &snapshot)?;
            println!(
                "VM '{name}' is running from snapshot {id} ({} ms)",
                started.elapsed().as_millis()
            );
        }
        SnapshotCommand::Delete { name, snapshot } => {
            let info = delete(library, &name, &snapshot)?;
            println!("Deleted snapshot '{}' ({}) of VM '{name}'", info.name, info.id);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

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
    match client
        .call(Request::SnapshotTake { name: snapshot.map(str::to_string) })
        .map_err(refused)?
    {
        Response::Snapshot { snapshot, .. } => Ok(snapshot),
        other => bail!("Unexpected reply: {other:?}"),
    }
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
        crate::commands::spawn_vm(library, name, Some(&id))?;
        return Ok(id);
    };
    let before = client.status().map_err(refused)?.instance;
    client.call(Request::SnapshotRestore { snapshot: id.clone() }).map_err(refused)?;
    drop(client);
    // The VM process restarts itself into the snapshot: wait for the new instance.
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        if let DiskState::Running { pid: Some(p) } = vm.disk_state()? {
            let status = ControlClient::connect_with_timeout(&p.socket, Duration::from_secs(2))
                .and_then(|mut c| c.status());
            if let Ok(status) = status {
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
        client.call(Request::SnapshotDelete { snapshot: info.id.clone() }).map_err(refused)?;
        return Ok(info);
    }
    let _lock = vm
        .try_lock()?
        .ok_or_else(|| anyhow!("VM '{name}' is busy (starting or being changed); try again"))?;
    snapshots::delete(&vm, key, None)
}

/// Prints the tree: children indented under their parent, the current state marked.
fn print_tree(list: &SnapshotList) {
    if list.snapshots.is_empty() {
        println!("No snapshots");
        return;
    }
    fn walk(list: &SnapshotList, parent: Option<&str>, depth: usize) {
        for s in list.snapshots.iter().filter(|s| s.parent.as_deref() == parent) {
            let here =
                if list.current.as_deref() == Some(&s.id) { "  ← you are here" } else { "" };
            println!(
                "{}{}  {}  {}  {} MiB on disk{here}",
                "  ".repeat(depth),
                s.name,
                s.id,
                format_time(s.created),
                s.disk_bytes >> 20
            );
            walk(list, Some(&s.id), depth + 1);
        }
    }
    walk(list, None, 0);
}

fn format_time(unix: u64) -> String {
    let age = crate::library::unix_now().saturating_sub(unix);
    match age {
        0..=59 => format!("{age} s ago"),
        60..=3599 => format!("{} min ago", age / 60),
        3600..=86399 => format!("{} h ago", age / 3600),
        _ => format!("{} days ago", age / 86400),
    }
}
