//! The transport's saved state: configuration space, the registers the driver programmed,
//! MSI-X, the live queues and the device's own bytes; saved from a running function and
//! checked in full before a restore changes anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::common_config::QueueConfigError;
use super::{QueueConfig, VirtioPciDevice, VIRTIO_MSI_NO_VECTOR};
use crate::devices::bus::lock;
use crate::error_chain;
use crate::pci::config::INTERRUPT_REG;
use crate::pci::msix::{MsixTable, MsixTableState};
use crate::state::{self, StateError};
use crate::virtio::queue::{SavedQueue, VirtioQueueError};
use crate::virtio::{device_name, RestoredQueues, VirtioInterrupt, STATUS_DRIVER_OK};

/// Why saved transport state does not fit this function.
#[derive(Debug, thiserror::Error)]
pub(super) enum VirtioPciStateError {
    /// The MSI-X table's own check (`pci::msix`) refused it.
    #[error("MSI-X table is invalid")]
    Msix(#[source] crate::pci::PciError),
    #[error("{saved} queues saved, the device has {expected}")]
    QueueCount { saved: usize, expected: usize },
    #[error("MSI-X vectors saved for another number of queues")]
    VectorCount,
    #[error("MSI-X vector out of range")]
    VectorOutOfRange,
    #[error("Queue {index} registers are unusable")]
    QueueRegisters {
        index: usize,
        #[source]
        source: QueueConfigError,
    },
    #[error("Queues saved for an inactive device")]
    LiveQueuesWhileInactive,
    #[error("Active without DRIVER_OK or with the wrong queues")]
    ActiveMismatch,
    #[error("Queue {0} differs from its registers")]
    QueueDiffers(usize),
    #[error("Queue {index} cannot be restored")]
    LiveQueue {
        index: usize,
        #[source]
        source: VirtioQueueError,
    },
}

/// What the driver programmed for one queue, saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The MSI-X table, PBA and vectors, and the ISR, saved. The table's fields come first, as
/// they did when they were this struct's own (bincode has no struct boundaries: same bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSaved {
    pub table: MsixTableState,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub isr: u8,
}

/// Saved state of a virtio-pci function: configuration space, transport registers, the
/// live queues (when active) and the device's own bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub config: Vec<u32>,
    pub status: u8,
    /// DEVICE_NEEDS_RESET raised by an I/O thread.
    pub failed: bool,
    pub active: bool,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueRegisters>,
    /// The device's queues (positions included) while active; empty otherwise.
    pub live_queues: Vec<SavedQueue>,
    pub msix: MsixSaved,
    #[serde(with = "serde_bytes")]
    pub device: Vec<u8>,
}

/// Saved state that passed every check, ready to apply.
struct Checked {
    configs: Vec<QueueConfig>,
    msix: MsixTable,
    /// The live queues of an active device.
    queues: Option<Vec<Queue>>,
}

impl VirtioPciDevice {
    pub(super) fn save(&self) -> Result<VirtioPciState, StateError> {
        let device = lock(&self.device);
        let name = device_name(device.device_type());
        let live_queues = if self.active {
            let states = device.queue_states().ok_or_else(|| {
                StateError::not_snapshottable(&name, "its queues cannot be saved")
            })?;
            if states.len() != self.queues.len() {
                return Err(StateError::not_snapshottable(&name, "it reports the wrong queues"));
            }
            states.into_iter().map(SavedQueue::from).collect()
        } else {
            Vec::new()
        };
        let device_bytes = device.save_state()?;
        let device_type = device.device_type();
        drop(device);
        let st = lock(&self.interrupt.state);
        Ok(VirtioPciState {
            device_type,
            config: self.config.registers(),
            status: self.status,
            failed: self.failed.load(Ordering::Acquire),
            active: self.active,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegisters {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            live_queues,
            msix: MsixSaved {
                table: st.msix.save(),
                config_vector: st.config_vector,
                queue_vectors: st.queue_vectors.clone(),
                isr: st.isr,
            },
            device: device_bytes,
        })
    }

    /// Checks saved transport state against this function; returns the configured queues,
    /// the MSI-X table and, when active, the live queues rebuilt.
    fn check(&self, saved: &VirtioPciState) -> Result<Checked, VirtioPciStateError> {
        let msix = lock(&self.interrupt.state)
            .msix
            .restored(&saved.msix.table)
            .map_err(VirtioPciStateError::Msix)?;
        let entries = msix.len();
        if saved.queues.len() != self.queues.len() {
            return Err(VirtioPciStateError::QueueCount {
                saved: saved.queues.len(),
                expected: self.queues.len(),
            });
        }
        let m = &saved.msix;
        if m.queue_vectors.len() != self.queues.len() {
            return Err(VirtioPciStateError::VectorCount);
        }
        let valid_vector = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < entries;
        if !valid_vector(m.config_vector) || !m.queue_vectors.iter().all(|&v| valid_vector(v)) {
            return Err(VirtioPciStateError::VectorOutOfRange);
        }
        let mut configs = Vec::with_capacity(self.queues.len());
        for (i, (r, current)) in saved.queues.iter().zip(&self.queues).enumerate() {
            let qc = QueueConfig {
                max_size: current.max_size,
                size: r.size,
                enabled: r.enabled,
                desc: r.desc,
                driver: r.driver,
                device: r.device,
            };
            if qc.enabled {
                qc.build(&self.memory, false)
                    .map_err(|source| VirtioPciStateError::QueueRegisters { index: i, source })?;
            }
            configs.push(qc);
        }
        if !saved.active {
            if !saved.live_queues.is_empty() {
                return Err(VirtioPciStateError::LiveQueuesWhileInactive);
            }
            return Ok(Checked { configs, msix, queues: None });
        }
        if saved.status & STATUS_DRIVER_OK == 0 || saved.live_queues.len() != configs.len() {
            return Err(VirtioPciStateError::ActiveMismatch);
        }
        let mut queues = Vec::with_capacity(configs.len());
        for (i, (live, qc)) in saved.live_queues.iter().zip(&configs).enumerate() {
            let matches = live.max_size == qc.max_size
                && live.ready == qc.enabled
                && (!qc.enabled
                    || (live.size == qc.size
                        && live.desc_table == qc.desc
                        && live.avail_ring == qc.driver
                        && live.used_ring == qc.device));
            if !matches {
                return Err(VirtioPciStateError::QueueDiffers(i));
            }
            let queue = live
                .to_queue(&self.memory)
                .map_err(|source| VirtioPciStateError::LiveQueue { index: i, source })?;
            queues.push(queue);
        }
        Ok(Checked { configs, msix, queues: Some(queues) })
    }

    /// Registers saved before the PCI_CFG capability (the last one) was offered, with it
    /// added as a fresh device has it and linked after MSI-X; others as they are.
    /// Saved registers from before INTx was wired have interrupt pin 0 where this device
    /// has INTA#: they take this device's pin (their guest's driver used MSI-X; a re-probe
    /// sees the pin).
    fn with_pci_cfg_capability(&self, saved: &[u32]) -> Vec<u32> {
        let mut registers = saved.to_vec();
        if let Some(reg) = registers.get_mut(INTERRUPT_REG) {
            if *reg & 0xff00 == 0 {
                *reg |= self.config.read_reg(INTERRUPT_REG) & 0xff00;
            }
        }
        let (cap, msix) = (self.pci_cfg_reg, self.msix_control_reg);
        let absent = registers.get(cap..cap + 5).is_some_and(|r| r.iter().all(|&v| v == 0))
            && registers.get(msix).is_some_and(|&v| v & 0xff00 == 0);
        if absent {
            registers[cap] = self.config.read_reg(cap);
            registers[cap + 1] = u32::from(self.regs_bar);
            registers[msix] |= (cap as u32 * 4) << 8;
        }
        registers
    }

    pub(super) fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let name = self.name();
        let saved: VirtioPciState = state::decode(&name, bytes)?;
        if saved.device_type != lock(&self.device).device_type() {
            return Err(StateError::invalid(&name, "saved from another kind of device"));
        }
        let Checked { configs, msix, queues } =
            self.check(&saved).map_err(|e| StateError::invalid(&name, error_chain(&e)))?;
        // Checked before anything changes; applied only once the device took its state.
        let mut config = self.config.clone();
        let registers = self.with_pci_cfg_capability(&saved.config);
        config.restore_registers(&registers).map_err(|e| StateError::rejected(&name, e))?;
        self.stop_queue_threads();
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let restored =
            queues.map(|queues| RestoredQueues { memory: self.memory.clone(), interrupt, queues });
        let result = lock(&self.device).restore_state(&saved.device, restored);
        if let Err(e) = result {
            self.update_queue_threads();
            return Err(e);
        }
        self.config = config;
        {
            let m = &saved.msix;
            let mut st = lock(&self.interrupt.state);
            st.msix = msix;
            st.msix.set_bus_master(self.config.bus_master_enabled());
            st.config_vector = m.config_vector;
            st.queue_vectors = m.queue_vectors.clone();
            st.isr = m.isr;
            st.intx_disabled = self.config.intx_disabled();
            st.update_intx();
        }
        self.status = saved.status;
        self.failed.store(saved.failed, Ordering::Release);
        self.active = saved.active;
        self.device_feature_select = saved.device_feature_select;
        self.driver_feature_select = saved.driver_feature_select;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.queues = configs;
        // Where the old registers decoded says nothing about the restored ones: the root
        // tells the BAR's place again right after a restore (`PciDevice::bar_decoded`).
        self.regs_decoded = None;
        self.update_queue_threads();
        if !self.may_dma() {
            self.park();
        }
        // Coming back from parked is `resume`'s, which follows a restore and serves every
        // queue once.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{MsixSaved, MsixTableState, QueueRegisters, VirtioPciState};
    use crate::testing::assert_golden;
    use crate::virtio::queue::SavedQueue;

    const VIRTIO_PCI_STATE_HEX: &str = concat!(
        "020000000300000000000000f41a4210060010000000e0fe0f01010100000001",
        "0000006402003001000000000001000000000000000001010000100000000000",
        "0010100000000000002010000000000001000000000000000001050004000100",
        "0101000010000000000000101000000000000020100000000000020000000000",
        "00000000e0fe0000000040000000000000000010e0fe01000000410000000100",
        "0000020000000000000000010100000001000000000000000100030300000000",
        "000000090807",
    );

    #[test]
    fn virtio_pci_state_bytes_are_unchanged() {
        let state = VirtioPciState {
            device_type: 2,
            config: vec![0x1042_1af4, 0x0010_0006, 0xfee0_0000],
            status: 0x0f,
            failed: true,
            active: true,
            device_feature_select: 1,
            driver_feature_select: 1,
            driver_features: 0x1_3000_0264,
            queue_select: 0,
            queues: vec![QueueRegisters {
                size: 256,
                enabled: true,
                desc: 0x10_0000,
                driver: 0x10_1000,
                device: 0x10_2000,
            }],
            live_queues: vec![SavedQueue {
                max_size: 256,
                next_avail: 5,
                next_used: 4,
                event_idx_enabled: true,
                size: 256,
                ready: true,
                desc_table: 0x10_0000,
                avail_ring: 0x10_1000,
                used_ring: 0x10_2000,
            }],
            msix: MsixSaved {
                table: MsixTableState {
                    entries: vec![[0xfee0_0000, 0, 0x40, 0], [0xfee0_1000, 1, 0x41, 1]],
                    pending: vec![false, true],
                    enabled: true,
                    function_mask: false,
                },
                config_vector: 0,
                queue_vectors: vec![1],
                isr: 3,
            },
            device: vec![9, 8, 7],
        };
        assert_golden(&state, VIRTIO_PCI_STATE_HEX);
    }
}
