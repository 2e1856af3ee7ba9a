//! A VM's port forwards: kept in `vm.toml`, and applied at once to a running VM through its
//! control socket (its VM process binds the host port, so a busy port fails there, by name).

use anyhow::{anyhow, bail, Context};
use net::slirp::Forward;
use serde::Serialize;

use crate::library::{DiskState, Library, NetMode, VmConfig, VmDir};
use crate::service::vm::{control_of, probe, QUERY_TIMEOUT};

/// What `hutch forward NAME list` shows.
#[derive(Debug, Serialize)]
pub struct ForwardsView {
    pub name: String,
    pub net: String,
    pub running: bool,
    /// The forwards in `vm.toml` (those a running VM has active, as it took them).
    pub forwards: Vec<String>,
    /// The guest's DHCP address, when it runs and has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
}

fn parse(spec: &str) -> anyhow::Result<Forward> {
    spec.parse::<Forward>().map_err(|e| anyhow!("{e}"))
}

fn user_net(vm: &VmDir, config: &VmConfig) -> anyhow::Result<()> {
    if config.net != NetMode::User {
        bail!(
            "VM '{}' has no user-mode network (net = {}); forwards need net = user",
            vm.name(),
            config.net.name()
        );
    }
    Ok(())
}

pub fn list(library: &Library, name: &str) -> anyhow::Result<ForwardsView> {
    let vm = library.existing(name)?;
    let config = vm.load_config()?;
    let mut view = ForwardsView {
        name: name.to_string(),
        net: config.net.name().to_string(),
        running: false,
        forwards: config.forwards.clone(),
        guest_ip: None,
    };
    if let DiskState::Running { pid: Some(pidfile) } = vm.disk_state()? {
        view.running = true;
        if let Some(net) = probe(&pidfile.socket, QUERY_TIMEOUT).ok().and_then(|s| s.net) {
            view.forwards = net.forwards;
            view.guest_ip = net.guest_ip;
        }
    }
    Ok(view)
}

/// Adds `spec` to VM `name`: a running VM forwards it before `vm.toml` keeps it, so a port
/// that cannot be bound is never saved.
pub fn add(library: &Library, name: &str, spec: &str) -> anyhow::Result<String> {
    let vm = library.existing(name)?;
    let forward = parse(spec)?;
    let canonical = forward.to_string();
    // Held while the VM is stopped, so it cannot start meanwhile; None: it runs.
    let stopped = vm.try_lock()?;
    let mut config = vm.load_config()?;
    user_net(&vm, &config)?;
    if let Some(existing) =
        config.parsed_forwards()?.into_iter().find(|f| f.same_host_socket(&forward))
    {
        bail!("VM '{name}' already forwards {} ({existing})", forward.host());
    }
    if stopped.is_none() {
        control_of(&vm)?
            .forward_add(canonical.clone())
            .with_context(|| format!("VM '{name}' cannot forward {canonical}"))?;
    }
    config.forwards.push(canonical.clone());
    vm.write_config(&config)?;
    Ok(canonical)
}

/// Removes `spec` (as added) from VM `name`, and from the running VM first.
pub fn remove(library: &Library, name: &str, spec: &str) -> anyhow::Result<String> {
    let vm = library.existing(name)?;
    let forward = parse(spec)?;
    // Held while the VM is stopped, so it cannot start meanwhile; None: it runs.
    let stopped = vm.try_lock()?;
    let mut config = vm.load_config()?;
    let Some(index) = config.forwards.iter().position(|f| parse(f).is_ok_and(|f| f == forward))
    else {
        let have = if config.forwards.is_empty() {
            "none".to_string()
        } else {
            config.forwards.join(", ")
        };
        bail!("VM '{name}' does not forward {forward} (its forwards: {have})");
    };
    let removed = config.forwards.remove(index);
    if stopped.is_none() {
        control_of(&vm)?
            .forward_remove(removed.clone())
            .with_context(|| format!("VM '{name}' cannot stop forwarding {removed}"))?;
    }
    vm.write_config(&config)?;
    Ok(removed)
}
