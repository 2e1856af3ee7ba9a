//! The backend conformance tier (`vmm::conformance`) on this host's /dev/kvm.
//!
//! Without a usable /dev/kvm each test skips through `testkit::skip` (component `kvm`): a
//! failure under `CI=true` unless `HUTCH_TEST_ABSENT` lists `kvm`. These hand-assembled guests
//! run on an emulating (not hardware-assisted) /dev/kvm too, so they need no opt-in.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use backend_kvm::KvmHypervisor;
use vmm::conformance;

fn hypervisor() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(hv) => Some(hv),
        Err(e) => {
            testkit::skip("kvm", &format!("/dev/kvm not available: {e}"));
            None
        }
    }
}

#[test]
fn port_io_round_trip() {
    if let Some(hv) = hypervisor() {
        conformance::port_io_round_trip(&hv);
    }
}

#[test]
fn mmio_round_trip() {
    if let Some(hv) = hypervisor() {
        conformance::mmio_round_trip(&hv);
    }
}

#[test]
fn kick_interrupts_halted_vcpu() {
    if let Some(hv) = hypervisor() {
        conformance::kick_interrupts_halted_vcpu(&hv);
    }
}

#[test]
fn kick_before_run_is_not_lost() {
    if let Some(hv) = hypervisor() {
        conformance::kick_before_run_is_not_lost(&hv);
    }
}

#[test]
fn register_round_trip() {
    if let Some(hv) = hypervisor() {
        conformance::register_round_trip(&hv);
    }
}

#[test]
fn save_restore_round_trip() {
    if let Some(hv) = hypervisor() {
        conformance::save_restore_round_trip(&hv);
    }
}

#[test]
fn triple_fault_is_reported() {
    if let Some(hv) = hypervisor() {
        conformance::triple_fault_is_reported(&hv);
    }
}

#[test]
fn notifier_catches_guest_write() {
    if let Some(hv) = hypervisor() {
        conformance::notifier_catches_guest_write(&hv);
    }
}

#[test]
fn dirty_log_names_the_written_page() {
    if let Some(hv) = hypervisor() {
        conformance::dirty_log_names_the_written_page(&hv);
    }
}

#[test]
fn unmapped_memory_exits_and_maps_again_elsewhere() {
    if let Some(hv) = hypervisor() {
        conformance::unmapped_memory_exits_and_maps_again_elsewhere(&hv);
    }
}
