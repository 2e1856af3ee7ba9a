//! `hutch run|create|list|status|start|stop|console|screenshot|delete`.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::args::{CreateArgs, MediaArgs, MediaCommand, RunArgs, SerialTarget};
use crate::firmware;
use crate::library::{ExitKind, Library};
use crate::service::vm::{self as service, wire_name};
use crate::terminal::{pump_input, stdin_kind, InputEnd, RawTerminal, StdinKind};

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let stdio = args.serial == SerialTarget::Stdio;
    let mut config = args.machine.to_config();
    let mut scratch_vars = None;
    config.firmware = match args.firmware {
        Some(keyword) if keyword.as_os_str() == firmware::UEFI_KEYWORD => {
            let found = firmware::find_uefi_in_env()?;
            let vars = match args.vars {
                Some(vars) => vars,
                None => {
                    let scratch = ScratchFile(
                        std::env::temp_dir()
                            .join(format!("hutch-run-{}-vars.fd", std::process::id())),
                    );
                    // A leftover of a crashed run with the same pid is not this run's.
                    let _ = std::fs::remove_file(&scratch.0);
                    firmware::ensure_nvram(&scratch.0, &found.vars_template)?;
                    scratch_vars.insert(scratch).0.clone()
                }
            };
            Some(Box::new(vmm::board::FirmwareBoot {
                code: found.code,
                vars: Some(vars),
                vga_bios: None,
            }))
        }
        Some(keyword) if keyword.as_os_str() == firmware::BIOS_KEYWORD => {
            // `hutch run` is headless: no screen, so no VGA BIOS.
            let code = firmware::find_bios_in_env()?;
            Some(Box::new(vmm::board::FirmwareBoot { code, vars: None, vga_bios: None }))
        }
        Some(code) => {
            Some(Box::new(vmm::board::FirmwareBoot { code, vars: args.vars, vga_bios: None }))
        }
        None => None,
    };
    let _scratch_disk = match args.new_disk {
        Some(size) => {
            let scratch = ScratchFile(
                std::env::temp_dir().join(format!("hutch-run-{}-disk.qcow2", std::process::id())),
            );
            let _ = std::fs::remove_file(&scratch.0);
            service::create_blank_disk(&scratch.0, size)?;
            config
                .disks
                .insert(0, crate::library::DiskEntry { path: scratch.0.clone(), readonly: false });
            eprintln!(
                "hutch: a new {} MiB disk for this run, removed when it ends: {}",
                size >> 20,
                scratch.0.display()
            );
            Some(scratch)
        }
        None => None,
    };
    let end = service::run_foreground(config, &args.serial, |vm| {
        let kind = if stdio { stdin_kind() } else { StdinKind::Other };
        let raw = if kind == StdinKind::Tty {
            eprintln!("hutch: serial console on this terminal; Ctrl+] powers the VM off");
            Some(
                RawTerminal::enter(libc::STDIN_FILENO)
                    .context("Cannot put the terminal in raw mode")?,
            )
        } else {
            None
        };
        if kind != StdinKind::Other {
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let end = pump_input(io::stdin().lock(), kind == StdinKind::Tty, |bytes| {
                        vm.serial_input(bytes);
                        true
                    });
                    if end == InputEnd::Escape {
                        vm.poweroff();
                    }
                })
                .context("Cannot start the stdin thread")?;
        }
        Ok(raw)
    })?;
    match end {
        ExitKind::ForcedOff => eprintln!("hutch: the VM was powered off"),
        ExitKind::PowerOff | ExitKind::Reset | ExitKind::Failed => {}
    }
    Ok(())
}

/// A file of this run's own, removed when the run ends.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn create(library: &Library, name: &str, args: &CreateArgs) -> anyhow::Result<()> {
    match &args.new_disk {
        Some(bytes) => {
            service::create_with_new_disk(library, name, args.to_config(), *bytes)?;
            println!("Created VM '{name}' with a new {} MiB disk", bytes >> 20);
        }
        None => {
            service::create(library, name, args.to_config())?;
            println!("Created VM '{name}'");
        }
    }
    Ok(())
}

pub fn media(library: &Library, args: MediaArgs) -> anyhow::Result<()> {
    let name = args.name;
    match args.command {
        None => match library.existing(&name)?.load_config()?.iso {
            Some(iso) => println!("{}", iso.display()),
            None => println!("VM '{name}' has no CD"),
        },
        Some(MediaCommand::Insert { iso }) => {
            service::change_media(library, &name, Some(&iso))?;
            println!("VM '{name}' has {} in its CD drive", iso.display());
        }
        Some(MediaCommand::Eject) => match service::change_media(library, &name, None)? {
            Some(old) => println!("VM '{name}': ejected {}", old.display()),
            None => println!("VM '{name}' had no CD"),
        },
    }
    Ok(())
}

pub fn list(library: &Library, json: bool) -> anyhow::Result<()> {
    let views = service::list(library)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    let w = views.iter().map(|v| v.name.len()).max().unwrap_or(0).max(4);
    println!("{:<w$}  {:<12}  {:>4}  {:>10}", "NAME", "STATE", "CPUS", "MEMORY");
    for v in &views {
        let mem = format!("{} MiB", v.memory_mib);
        println!("{:<w$}  {:<12}  {:>4}  {:>10}", v.name, v.state, v.cpus, mem);
    }
    Ok(())
}

pub fn status(library: &Library, name: &str, json: bool) -> anyhow::Result<()> {
    let v = service::status(library, name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("name:    {}", v.name);
    println!("state:   {}", v.state);
    if let Some(pid) = v.pid {
        println!("pid:     {pid}");
    }
    println!("cpus:    {}", v.cpus);
    println!("memory:  {} MiB", v.memory_mib);
    if let Some(up) = v.uptime_secs {
        println!("uptime:  {}", format_duration(up));
    }
    if let Some(display) = &v.display {
        println!("display: {display}");
    }
    println!("network: {}", v.net);
    if let Some(ip) = &v.guest_ip {
        println!("guest address: {ip}");
    }
    for forward in &v.forwards {
        println!("forward: {forward}");
    }
    if let Some(rec) = &v.last_exit {
        let reason = wire_name(&rec.reason);
        println!("last exit: {reason}");
    }
    if let Some(err) = &v.error {
        println!("error:   {err}");
    }
    Ok(())
}

fn format_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

pub fn start(library: &Library, name: &str) -> anyhow::Result<()> {
    let st = service::start(library, name)?;
    println!("VM '{name}' started (pid {}): {}", st.pid, wire_name(&st.state));
    Ok(())
}

pub fn stop(library: &Library, name: &str, force: bool, timeout: u64) -> anyhow::Result<()> {
    service::stop(library, name, force, timeout)?;
    println!("VM '{name}' stopped");
    Ok(())
}

pub fn console(library: &Library, name: &str) -> anyhow::Result<()> {
    let stream = service::console(library, name)?;
    crate::console::attach(stream, name)?;
    Ok(())
}

pub fn screenshot(library: &Library, name: &str, output: &Path) -> anyhow::Result<()> {
    let (width, height) = service::screenshot(library, name, output)?;
    println!("Saved {width}x{height} screenshot to {}", output.display());
    Ok(())
}

pub fn delete(library: &Library, name: &str) -> anyhow::Result<()> {
    service::delete(library, name)?;
    println!("Deleted VM '{name}'");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_human_readable() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(65), "1m 5s");
        assert_eq!(format_duration(3725), "1h 2m 5s");
    }
}
