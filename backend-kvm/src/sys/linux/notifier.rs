//! Guest notifiers as KVM ioeventfds: a guest MMIO write to a registered address completes
//! inside KVM (no return from KVM_RUN) and bumps an eventfd that a device thread reads.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm::hypervisor::{GuestNotifier, HypervisorError, Result};
use vmm_sys_util::eventfd::EventFd;

use super::os;

/// One registered ioeventfd; unregistered on drop. Registered without a data match, which
/// kvm-ioctls sends as length 0: KVM then catches writes of any width at the address.
pub struct KvmNotifier {
    vm: Arc<VmFd>,
    event: EventFd,
    addr: u64,
}

impl KvmNotifier {
    pub fn new(vm: Arc<VmFd>, addr: u64, len: u32) -> Result<KvmNotifier> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(HypervisorError::Os {
                op: "KVM_IOEVENTFD",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("notifier length {len} is not 1, 2, 4 or 8"),
                ),
            });
        }
        // Blocking reads: `wait` sleeps in read(2) until the guest (or `wake`) writes.
        let event =
            EventFd::new(0).map_err(|source| HypervisorError::Os { op: "eventfd", source })?;
        vm.register_ioevent(&event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(os("KVM_IOEVENTFD"))?;
        Ok(KvmNotifier { vm, event, addr })
    }
}

impl GuestNotifier for KvmNotifier {
    fn wait(&self) -> Result<()> {
        loop {
            match self.event.read() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(HypervisorError::Os { op: "eventfd read", source }),
            }
        }
    }

    fn wake(&self) {
        if let Err(e) = self.event.write(1) {
            log::error!("kvm: could not wake a notifier waiter: {e}");
        }
    }
}

impl Drop for KvmNotifier {
    fn drop(&mut self) {
        if let Err(e) =
            self.vm.unregister_ioevent(&self.event, &IoEventAddress::Mmio(self.addr), NoDatamatch)
        {
            log::error!("kvm: could not unregister the notifier at {:#x}: {e}", self.addr);
        }
    }
}
