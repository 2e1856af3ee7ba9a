//! The command line: clap types in [`args`], one function per subcommand that calls the
//! service layer and prints what it did. Nothing here is used by the GUI.

pub mod args;
mod disk;
mod forward;
mod import;
mod progress;
mod snapshot;
mod vm;

use std::process::ExitCode;

use args::Command;

use crate::library::Library;

pub use args::Cli;

/// Runs one parsed command.
pub fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => vm::run(args),
        Command::VmProcess { name, restore } => {
            crate::vm_process::main(&Library::from_env()?, &name, restore.as_deref())
        }
        Command::Disk(cmd) => disk::run(cmd),
        other => {
            let library = Library::from_env()?;
            match other {
                Command::Create(args) => vm::create(&library, &args.name, &args),
                Command::List { json } => vm::list(&library, json),
                Command::Start { name } => vm::start(&library, &name),
                Command::Console { name } => vm::console(&library, &name),
                Command::Stop { name, force, timeout } => vm::stop(&library, &name, force, timeout),
                Command::Status { name, json } => vm::status(&library, &name, json),
                Command::Delete { name } => vm::delete(&library, &name),
                Command::Screenshot { name, output } => vm::screenshot(&library, &name, &output),
                Command::Import(args) => import::run(&library, &args),
                Command::Snapshot(cmd) => snapshot::run(&library, cmd),
                Command::Forward(cmd) => forward::run(&library, cmd),
                Command::Media(args) => vm::media(&library, args),
                Command::Gui => crate::gui::run(library),
                Command::Run(_) | Command::VmProcess { .. } | Command::Disk(_) => {
                    unreachable!("handled above")
                }
            }
        }
    }
    .map(|()| ExitCode::SUCCESS)
}
