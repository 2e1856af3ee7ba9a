//! `hutch forward NAME list|add|remove`.

use super::args::{ForwardArgs, ForwardCommand};
use crate::library::Library;
use crate::service::net as service;

pub fn run(library: &Library, args: ForwardArgs) -> anyhow::Result<()> {
    let name = args.name;
    match args.command {
        ForwardCommand::List { json } => {
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
        ForwardCommand::Add { spec } => {
            let added = service::add(library, &name, &spec)?;
            println!("VM '{name}' forwards {added}");
        }
        ForwardCommand::Remove { spec } => {
            let removed = service::remove(library, &name, &spec)?;
            println!("VM '{name}' no longer forwards {removed}");
        }
    }
    Ok(())
}
