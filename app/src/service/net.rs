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
    let _edit = vm.edit_lock()?;
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
    let _edit = vm.edit_lock()?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::service::library_with_vm;

    #[test]
    fn concurrent_forward_adds_all_end_up_in_vm_toml() {
        let (_home, lib) = library_with_vm();
        let ports: Vec<u16> = (0..8).map(|i| 40000 + i).collect();
        std::thread::scope(|s| {
            let adds: Vec<_> = ports
                .iter()
                .map(|p| {
                    let lib = &lib;
                    s.spawn(move || add(lib, "vm", &format!("tcp::{p}-:22")))
                })
                .collect();
            for a in adds {
                a.join().unwrap().expect("every add succeeds");
            }
        });
        let mut kept = lib.existing("vm").unwrap().load_config().unwrap().forwards;
        kept.sort();
        let want: Vec<String> = ports.iter().map(|p| format!("tcp:127.0.0.1:{p}-:22")).collect();
        assert_eq!(kept, want, "no add lost another's");
    }

    #[test]
    fn a_forward_is_added_listed_and_removed_on_a_stopped_vm() {
        let (_home, lib) = library_with_vm();
        assert_eq!(add(&lib, "vm", "tcp::2222-:22").unwrap(), "tcp:127.0.0.1:2222-:22");
        let err = add(&lib, "vm", "tcp:127.0.0.1:2222-:80").unwrap_err();
        assert!(format!("{err:#}").contains("already forwards"), "{err:#}");
        let view = list(&lib, "vm").unwrap();
        assert!(!view.running);
        assert_eq!(view.forwards, ["tcp:127.0.0.1:2222-:22"]);
        remove(&lib, "vm", "tcp::2222-:22").unwrap();
        assert!(list(&lib, "vm").unwrap().forwards.is_empty());
        let err = remove(&lib, "vm", "tcp::2222-:22").unwrap_err();
        assert!(format!("{err:#}").contains("does not forward"), "{err:#}");
    }
}
