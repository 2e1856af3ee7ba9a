//! `hutch snapshot take|list|restore|delete`.

use std::time::Instant;

use super::args::SnapshotCommand;
use crate::library::Library;
use crate::service::snapshot::{delete, list, restore, take};
use crate::snapshots::SnapshotList;

pub fn run(library: &Library, cmd: SnapshotCommand) -> anyhow::Result<()> {
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
    Ok(())
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
