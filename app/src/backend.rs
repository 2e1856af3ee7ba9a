//! Choosing and opening the hypervisor backend (`HUTCH_BACKEND=kvm|hvf`, default per OS), and
//! checking that a VM fits this host.

use anyhow::{bail, Context};
use vmm::hypervisor::Hypervisor;

use crate::library::VmConfig;

pub const BACKEND_ENV: &str = "HUTCH_BACKEND";

fn default_backend() -> &'static str {
    if cfg!(target_os = "macos") {
        "hvf"
    } else {
        "kvm"
    }
}

/// Opens backend `name`, or the one named by `HUTCH_BACKEND`, or this OS's default.
pub fn open_hypervisor(name: Option<&str>) -> anyhow::Result<Box<dyn Hypervisor>> {
    let from_env = std::env::var(BACKEND_ENV).ok().filter(|v| !v.is_empty());
    let name = name.map(str::to_string).or(from_env).unwrap_or(default_backend().to_string());
    match name.as_str() {
        "kvm" => open_kvm(),
        "hvf" => open_hvf(),
        other => bail!("Unknown hypervisor backend '{other}' (set {BACKEND_ENV} to kvm or hvf)"),
    }
}

/// Set to 1 to run VMs on a /dev/kvm that is not hardware-assisted: only hand-assembled test
/// guests (tests/e2e/pvh-kernel.py) run there; a real kernel fails after a minute of emulation.
pub const ALLOW_EMULATED_KVM_ENV: &str = "HUTCH_ALLOW_EMULATED_KVM";

#[cfg(target_os = "linux")]
fn open_kvm() -> anyhow::Result<Box<dyn Hypervisor>> {
    let allowed = std::env::var(ALLOW_EMULATED_KVM_ENV).is_ok_and(|v| v == "1");
    check_kvm_acceleration(backend_kvm::kvm_acceleration(), allowed).context("Cannot open KVM")?;
    Ok(Box::new(backend_kvm::KvmHypervisor::new().context("Cannot open KVM")?))
}

/// Refuses an emulating /dev/kvm at once (unless `allowed`), instead of letting a guest kernel
/// crawl for a minute into an emulation failure.
#[cfg(target_os = "linux")]
fn check_kvm_acceleration(
    acceleration: backend_kvm::KvmAcceleration,
    allowed: bool,
) -> anyhow::Result<()> {
    let backend_kvm::KvmAcceleration::NotHardwareAssisted { reason } = acceleration else {
        return Ok(());
    };
    if allowed {
        log::warn!("/dev/kvm is not hardware-assisted ({reason}); {ALLOW_EMULATED_KVM_ENV}=1");
        return Ok(());
    }
    bail!(
        "/dev/kvm on this host is not hardware-assisted ({reason}): a guest's kernel would be \
         emulated instruction by instruction and fail. Run Hutch on a machine with hardware \
         virtualization (enable VT-x/AMD-V in the firmware, or nested virtualization for a \
         virtual machine); developers without one can use the nested KVM lab \
         (tests/lab/lab.sh -- COMMAND; tools/demo.sh uses it). {ALLOW_EMULATED_KVM_ENV}=1 runs \
         anyway, for hand-assembled test guests."
    )
}

#[cfg(not(target_os = "linux"))]
fn open_kvm() -> anyhow::Result<Box<dyn Hypervisor>> {
    bail!("The KVM backend exists only on Linux")
}

#[cfg(target_os = "macos")]
fn open_hvf() -> anyhow::Result<Box<dyn Hypervisor>> {
    // The HVF backend is not written yet (backend-hvf holds its plan).
    Err(anyhow::anyhow!("The HVF backend is not implemented yet"))
        .context("Cannot open Hypervisor.framework")
}

#[cfg(not(target_os = "macos"))]
fn open_hvf() -> anyhow::Result<Box<dyn Hypervisor>> {
    bail!("The HVF backend exists only on macOS")
}

/// The host's physical RAM in MiB, if the OS says.
pub fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) =
        unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || page_size <= 0 {
        return None;
    }
    Some((pages as u64).saturating_mul(page_size as u64) >> 20)
}

/// Refuses a VM that asks for more RAM than the host has (it would only end in the OOM
/// killer, long after start reported success).
pub fn check_fits_host(config: &VmConfig) -> anyhow::Result<()> {
    if let Some(host) = host_memory_mib() {
        if config.memory_mib > host {
            bail!(
                "Invalid value for memory: {} MiB is more than this host's {host} MiB of RAM",
                config.memory_mib
            );
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn unknown_backend_names_are_rejected_by_name() {
        let err = open_hypervisor(Some("qemu")).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(err.contains("'qemu'"), "{err}");
    }

    #[test]
    fn the_other_oses_backend_is_a_clear_error() {
        let other = if cfg!(target_os = "macos") { "kvm" } else { "hvf" };
        let err = open_hypervisor(Some(other)).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(err.contains("only on"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_emulating_kvm_is_refused_with_what_to_do_unless_allowed() {
        use backend_kvm::KvmAcceleration;
        let emulated = || KvmAcceleration::NotHardwareAssisted { reason: "no svm".into() };
        let err = check_kvm_acceleration(emulated(), false).map_err(|e| e.to_string());
        let err = err.err().unwrap_or_default();
        assert!(err.contains("not hardware-assisted (no svm)"), "{err}");
        assert!(err.contains("tests/lab/lab.sh") && err.contains(ALLOW_EMULATED_KVM_ENV), "{err}");
        assert!(check_kvm_acceleration(emulated(), true).is_ok());
        let assisted = KvmAcceleration::HardwareAssisted { module: "kvm_amd".into() };
        assert!(check_kvm_acceleration(assisted, false).is_ok());
        assert!(check_kvm_acceleration(KvmAcceleration::Unknown, false).is_ok());
    }

    #[test]
    fn host_memory_is_known_and_plausible() {
        let mib = host_memory_mib().unwrap();
        assert!(mib >= 64, "{mib}");
    }
}
