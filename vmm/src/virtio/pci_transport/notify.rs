//! Queue notifies (virtio 1.2 section 4.1.4.4): a write to queue n's slot in the notify
//! region processes the queue on the vCPU that wrote it; with a notifier registry, each
//! enabled queue instead gets an I/O thread sleeping on a hypervisor notifier (KVM: an
//! ioeventfd) registered at that slot, so the guest's write completes without a VMM exit.
//! The threads follow the device state and where the PCI root decodes the BAR (moved by the
//! guest, decoding turned off, or mid-sizing: no notifier), and stop while quiesced or
//! while bus mastering is off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::error;

use super::{PciInterrupt, VirtioPciDevice, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use crate::devices::bus::lock;
use crate::error_chain;
use crate::hypervisor::{GuestNotifier, HypervisorError};
use crate::virtio::{VirtioDevice, VirtioInterrupt, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK};

/// Why a queue keeps its notifies on the synchronous MMIO path.
#[derive(Debug, thiserror::Error)]
pub(super) enum QueueThreadError {
    #[error("Could not register the notifier")]
    Notifier(#[source] HypervisorError),
    #[error("Could not start the I/O thread")]
    Spawn(#[source] std::io::Error),
}

/// An I/O thread serving one queue: it sleeps on the queue's notifier (the guest's notify
/// write completes in the hypervisor), processes the queue and raises its interrupt.
pub(super) struct QueueThread {
    /// The notify region's address the notifier was registered under.
    base: u64,
    notifier: Arc<dyn GuestNotifier>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl QueueThread {
    fn start(
        index: usize,
        base: u64,
        notifier: crate::hypervisor::Result<Box<dyn GuestNotifier>>,
        device: Arc<Mutex<Box<dyn VirtioDevice>>>,
        interrupt: Arc<PciInterrupt>,
        failed: Arc<AtomicBool>,
    ) -> Result<QueueThread, QueueThreadError> {
        let notifier: Arc<dyn GuestNotifier> =
            Arc::from(notifier.map_err(QueueThreadError::Notifier)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let notifier = notifier.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("virtio-q{index}"))
                .spawn(move || serve_queue(index, &*notifier, &stop, &device, &interrupt, &failed))
                .map_err(QueueThreadError::Spawn)?
        };
        // Notifies written before the notifier existed went to the MMIO path; a first pass
        // here would only find an empty ring, so nothing is lost.
        Ok(QueueThread { base, notifier, stop, thread: Some(thread) })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.notifier.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("virtio-pci: an I/O thread panicked");
            }
        }
    }
}

impl Drop for QueueThread {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            self.notifier.wake();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn serve_queue(
    index: usize,
    notifier: &dyn GuestNotifier,
    stop: &AtomicBool,
    device: &Mutex<Box<dyn VirtioDevice>>,
    interrupt: &PciInterrupt,
    failed: &AtomicBool,
) {
    loop {
        if let Err(e) = notifier.wait() {
            error!("virtio-pci: queue {index} notifier failed: {e}");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        if failed.load(Ordering::Acquire) {
            continue;
        }
        let result = lock(device).process_queue(index);
        match result {
            Ok(true) => interrupt.signal_used_queue(index as u16),
            Ok(false) => {}
            Err(e) => {
                error!("virtio-pci: queue {index}: {e}");
                failed.store(true, Ordering::Release);
                interrupt.signal_config_change();
            }
        }
    }
}

impl VirtioPciDevice {
    /// Guest-physical address of the notify region while notifiers should be registered:
    /// the device is active and the root decodes the register BAR (memory decoding on, a
    /// real address inside a window).
    fn notify_base(&self) -> Option<u64> {
        if !self.active || self.notifiers.is_none() {
            return None;
        }
        self.regs_decoded.and_then(|a| a.checked_add(NOTIFY_OFFSET))
    }

    /// Brings the I/O threads in line with the device state and where the root decodes the
    /// register BAR: a notifier at an address the root no longer decodes would still catch
    /// the guest's writes there.
    pub(super) fn update_queue_threads(&mut self) {
        let want = if self.may_dma() { self.notify_base() } else { None };
        if self.queue_threads.first().map(|w| w.base) == want {
            return;
        }
        self.stop_queue_threads();
        let (Some(base), Some(registry)) = (want, self.notifiers.clone()) else {
            return;
        };
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let addr = base + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            match QueueThread::start(
                index,
                base,
                registry.register_notifier(addr, 2),
                self.device.clone(),
                self.interrupt.clone(),
                self.failed.clone(),
            ) {
                Ok(w) => self.queue_threads.push(w),
                Err(e) => {
                    // The notify still works, through the MMIO exit.
                    log::debug!(
                        "virtio-pci: queue {index} notifies stay synchronous: {}",
                        error_chain(&e)
                    );
                }
            }
        }
    }

    pub(super) fn stop_queue_threads(&mut self) {
        for w in self.queue_threads.drain(..) {
            w.stop();
        }
    }

    pub(super) fn notify(&mut self, queue_index: usize) {
        if !self.active
            || queue_index >= self.queues.len()
            || self.status & STATUS_DRIVER_OK == 0
            || self.status & STATUS_DEVICE_NEEDS_RESET != 0
        {
            return;
        }
        if self.failed.load(Ordering::Acquire) || !self.may_dma() {
            // Served by the pass made when the device may touch guest memory again
            // (resume, or bus mastering back on).
            return;
        }
        let result = lock(&self.device).process_queue(queue_index);
        match result {
            Ok(true) => self.interrupt.signal_used_queue(queue_index as u16),
            Ok(false) => {}
            Err(e) => self.device_failure(&format!("queue {queue_index}: {e}")),
        }
    }
}
