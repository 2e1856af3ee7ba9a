//! `hutch import`.

use anyhow::bail;

use super::args::ImportArgs;
use super::progress::{catch_interrupt, Progress};
use crate::library::Library;
use crate::service::disk::is_cancelled;
use crate::service::import::{import, DiskOrigin, ImportOptions};

pub fn run(library: &Library, args: &ImportArgs) -> anyhow::Result<()> {
    catch_interrupt();
    let progress = Progress::new("Importing");
    let result =
        import(library, &args.file, &ImportOptions::from(args), &|d, t| progress.update(d, t));
    progress.finish();
    let outcome = match result {
        Ok(o) => o,
        Err(e) if is_cancelled(&e) => bail!("Cancelled; no VM was created"),
        Err(e) => return Err(e),
    };
    for w in &outcome.warnings {
        eprintln!("hutch: warning: {w}");
    }
    println!(
        "Imported VM '{}' ({} CPU{}, {} MiB)",
        outcome.name,
        outcome.config.cpus,
        if outcome.config.cpus == 1 { "" } else { "s" },
        outcome.config.memory_mib
    );
    println!("  boots {}", outcome.boots);
    if let Some(iso) = &outcome.config.iso {
        println!("  CD {} (read-only; booted while the disk is blank)", iso.display());
    }
    for (path, origin) in &outcome.disks {
        let how = match origin {
            DiskOrigin::Converted(f) => format!("converted from {}", f.name()),
            DiskOrigin::InPlace(f) => format!("{} image used in place", f.name()),
            DiskOrigin::Overlay(f) => format!("qcow2 overlay over the {} image", f.name()),
            DiskOrigin::New(bytes) => format!("new, empty, {} GiB", bytes >> 30),
        };
        println!("  disk {} ({how})", path.display());
    }
    Ok(())
}
