//! `hutch forward NAME list|add|remove`.

use super::args::ForwardCommand;
use crate::library::Library;
use crate::service::net as service;

pub fn run(library: &Library, command: ForwardCommand) -> anyhow::Result<()> {
    match command {
        ForwardCommand::List { name, json } => {
            let view = service::list(library, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(());
            }
            if view.forwards.is_empty() {
                println!("VM '{name}' forwards no ports (network: {})", view.net);
            }
            for forward in &view.forwards {
                println!("{forward}");
            }
        }
        ForwardCommand::Add { name, spec } => {
            let added = service::add(library, &name, &spec)?;
            println!("VM '{name}' forwards {added}");
        }
        ForwardCommand::Remove { name, spec } => {
            let removed = service::remove(library, &name, &spec)?;
            println!("VM '{name}' no longer forwards {removed}");
        }
    }
    Ok(())
}
