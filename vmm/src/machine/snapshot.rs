//! Taking a snapshot of a running machine: pause at a safe point, quiesce I/O, save every
//! vCPU on its own thread, every device by id, and guest RAM; switch the disks to new layers.

use std::path::Path;
use std::time::{Duration, Instant};

use super::handle::MachineHandle;
use super::persist::{save_devices, MachineState};
use super::{MachineError, RunState};
use crate::devices::bus::lock;

/// An error from the caller's part of a snapshot (opening the new layers, recording it).
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// How long the parts of a snapshot took, for the log and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotTimes {
    /// From the pause request until every vCPU stopped.
    pub pause: Duration,
    /// vCPU, VM and device state.
    pub state: Duration,
    /// Writing guest RAM and fsyncing the file.
    pub memory: Duration,
    /// The guest was stopped this long in all.
    pub stopped: Duration,
}

impl MachineHandle {
    /// Saves the running machine to `path` (see [`crate::snapshot`]) and lets it run on.
    ///
    /// The guest stops at a safe point, the devices' I/O threads are joined, and the disks are
    /// flushed; then vCPU, VM and device state and guest RAM are written. While the guest is
    /// still stopped, `open_new_disks` (given the flushed, now frozen images) opens the layers
    /// the machine continues on — one per disk, in order; `commit` records the snapshot
    /// wherever the caller keeps it. If either fails, the machine keeps its old disks, the
    /// file is removed, and the guest runs on as if nothing happened. A machine paused by
    /// its user stays paused.
    pub fn save_snapshot(
        &self,
        path: &Path,
        open_new_disks: &mut dyn FnMut() -> Result<Vec<Box<dyn disk::BlockBackend>>, HostError>,
        commit: &mut dyn FnMut() -> Result<(), HostError>,
    ) -> Result<SnapshotTimes, MachineError> {
        let _gate = lock(&self.snapshot_gate);
        let begin = Instant::now();
        let was_paused = self.state() == RunState::Paused;
        self.pause()?;
        let paused = Instant::now();
        let mut times = SnapshotTimes { pause: paused - begin, ..Default::default() };
        lock(&self.pci).quiesce_io();
        let result = self.save_paused(path, open_new_disks, commit, &mut times);
        lock(&self.pci).resume_io();
        if !was_paused {
            self.resume()?;
        }
        times.stopped = paused.elapsed();
        result.map(|()| times)
    }

    fn save_paused(
        &self,
        path: &Path,
        open_new_disks: &mut dyn FnMut() -> Result<Vec<Box<dyn disk::BlockBackend>>, HostError>,
        commit: &mut dyn FnMut() -> Result<(), HostError>,
        times: &mut SnapshotTimes,
    ) -> Result<(), MachineError> {
        let started = Instant::now();
        let state = self.collect_state()?;
        for disk in self.disks.iter() {
            disk::BlockBackend::flush(disk).map_err(|e| MachineError::DiskSwitch(e.into()))?;
        }
        let bytes = state.encode()?;
        times.state = started.elapsed();
        let started = Instant::now();
        crate::snapshot::write(path, &bytes, &self.memory, self.board.name(), self.board.arch())?;
        times.memory = started.elapsed();
        let undo = |e: MachineError| {
            let _ = std::fs::remove_file(path);
            e
        };
        let new_disks = open_new_disks().map_err(MachineError::DiskSwitch).map_err(undo)?;
        if new_disks.len() != self.disks.len() {
            return Err(undo(MachineError::DiskSwitch(
                format!("{} new layers for {} disks", new_disks.len(), self.disks.len()).into(),
            )));
        }
        for (new, disk) in new_disks.iter().zip(self.disks.iter()) {
            if new.size() != disk::BlockBackend::size(disk) {
                return Err(undo(MachineError::DiskSwitch(
                    format!(
                        "a new layer of {} bytes for a disk of {}",
                        new.size(),
                        disk::BlockBackend::size(disk)
                    )
                    .into(),
                )));
            }
        }
        let old: Vec<_> =
            new_disks.into_iter().zip(self.disks.iter()).map(|(n, d)| d.replace(n)).collect();
        if let Err(e) = commit() {
            for (old, disk) in old.into_iter().zip(self.disks.iter()) {
                disk.replace(old);
            }
            return Err(undo(MachineError::DiskSwitch(e)));
        }
        Ok(())
    }

    /// Every part of the machine's state but RAM. The machine must be paused and quiesced.
    fn collect_state(&self) -> Result<MachineState, MachineError> {
        let states = self.lifecycle.save_vcpus(self.vcpu_count)?;
        let mut vcpus = Vec::with_capacity(self.vcpu_count as usize);
        for (vcpu, state) in states.into_iter().enumerate() {
            let state = state.ok_or(MachineError::PauseTimeout)?;
            vcpus.push(
                state.map_err(|source| MachineError::VcpuState { vcpu: vcpu as u32, source })?,
            );
        }
        Ok(MachineState {
            cpus: self.vcpu_count,
            memory_mib: self.memory_mib,
            display: self.display.is_some(),
            disks: self.disks.len(),
            vcpus,
            vm: self.vm.save_state()?,
            devices: save_devices(&self.saved)?,
        })
    }
}
