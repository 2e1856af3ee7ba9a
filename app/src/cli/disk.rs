//! `hutch disk info|convert|compact|resize`.

use std::path::Path;
use std::time::Instant;

use super::args::{DiskCommand, OutputFormat};
use super::progress::{catch_interrupt, Progress};
use crate::service::disk::{self as service, human, parse_size};

pub fn run(command: DiskCommand) -> anyhow::Result<()> {
    match command {
        DiskCommand::Info { file, json } => info(&file, json),
        DiskCommand::Convert { input, output, format, force } => {
            convert(&input, &output, format, force)
        }
        DiskCommand::Compact { file } => compact(&file),
        DiskCommand::Resize { file, size, shrink } => resize(&file, &size, shrink),
    }
}

fn info(path: &Path, json: bool) -> anyhow::Result<()> {
    let view = service::info(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let i = &view.image;
    println!("image:        {}", i.path.display());
    match &i.subformat {
        Some(sub) => println!("format:       {} ({sub})", i.format.name()),
        None => println!("format:       {}", i.format.name()),
    }
    println!("virtual size: {} ({} bytes)", human(i.virtual_size), i.virtual_size);
    println!("disk size:    {}", human(i.allocated_bytes));
    for (depth, parent) in view.backing_chain.iter().enumerate() {
        let label = if depth == 0 { "backing file:" } else { "             " };
        println!(
            "{label} {}{} ({})",
            "  ".repeat(depth),
            parent.path.display(),
            parent.format.name()
        );
    }
    if i.backing.is_some() && view.backing_chain.is_empty() {
        if let Some(b) = &i.backing {
            println!("backing file: {} (unreadable)", b.display());
        }
    }
    let all_problems: Vec<String> = i
        .problems
        .iter()
        .cloned()
        .chain(
            view.backing_chain
                .iter()
                .flat_map(|p| p.problems.iter().map(move |m| format!("{}: {m}", p.path.display()))),
        )
        .collect();
    if all_problems.is_empty() {
        println!("problems:     none");
    } else {
        println!("problems:");
        for p in all_problems {
            println!("  - {p}");
        }
    }
    Ok(())
}

fn convert(input: &Path, output: &Path, format: OutputFormat, force: bool) -> anyhow::Result<()> {
    catch_interrupt();
    let started = Instant::now();
    let progress = Progress::new("Converting");
    let result = service::convert(input, output, format.image_format(), force, &|d, t| {
        progress.update(d, t)
    });
    progress.finish();
    let (in_format, stats) = result?;
    println!(
        "Converted {} ({}) to {} ({}): {} of data copied, {} skipped as zeroes, in {:.1} s",
        input.display(),
        in_format.name(),
        output.display(),
        format.image_format().name(),
        human(stats.written),
        human(stats.zero_data + stats.sparse),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn compact(path: &Path) -> anyhow::Result<()> {
    catch_interrupt();
    let progress = Progress::new("Compacting");
    let result = service::compact(path, &|d, t| progress.update(d, t));
    progress.finish();
    let (before, after) = result?;
    println!(
        "Compacted {}: {} reclaimed ({} -> {})",
        path.display(),
        human(before.saturating_sub(after)),
        human(before),
        human(after)
    );
    Ok(())
}

fn resize(path: &Path, size: &str, shrink: bool) -> anyhow::Result<()> {
    let (old, new) = service::resize(path, parse_size(size)?, shrink)?;
    println!("Resized {} from {} to {}", path.display(), human(old), human(new));
    Ok(())
}
