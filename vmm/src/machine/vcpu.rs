//! One thread per vCPU: the vCPU is created on it and never leaves it (HVF binds vCPUs to
//! their thread), runs between safe points, and does the jobs asked of paused vCPUs.

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::lifecycle::Lifecycle;
use super::watchdog::{ExitTrace, TracedIo};
use super::{ExitReason, MachineError};
use crate::board::{Board, IoBuses};
use crate::devices::bus::lock;
use crate::hypervisor::{ArchVcpu, ExitHandler, VcpuExit, VcpuState, Vm};

/// What one vCPU thread loads before it first runs.
pub(crate) enum VcpuStart {
    /// The board sets its boot state (the boot CPU's entry point; the others wait for
    /// INIT/SIPI).
    Boot,
    Restore(Box<VcpuState>),
}

/// Everything a vCPU thread shares with the machine.
pub(crate) struct VcpuContext {
    pub vm: Arc<dyn Vm>,
    pub io: Arc<IoBuses>,
    pub board: Arc<dyn Board>,
    pub lifecycle: Arc<Lifecycle>,
    /// This vCPU's last accesses, for the silent-firmware diagnostic.
    pub trace: Arc<Mutex<ExitTrace>>,
}

pub(crate) fn vcpu_thread(
    id: u32,
    context: VcpuContext,
    start: VcpuStart,
    ready: mpsc::Sender<Result<(), MachineError>>,
) {
    let lifecycle = &context.lifecycle;
    let _guard = VcpuThreadGuard { lifecycle, id };
    let (mut vcpu, power_on) = match prepare_vcpu(id, &context, start) {
        Ok(prepared) => {
            let vcpu = &prepared.0;
            lock(&lifecycle.kickers).push(vcpu.kicker());
            let _ = ready.send(Ok(()));
            prepared
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut handler = TracedIo { io: &context.io, trace: &context.trace };
    // A guest's reset: back to the power-on state, then the board's boot state.
    let mut reset = |vcpu: &mut dyn ArchVcpu| {
        vcpu.restore_state(&power_on)
            .map_err(|source| MachineError::VcpuState { vcpu: id, source })?;
        context.board.init_vcpu(id, vcpu).map_err(|source| MachineError::Vcpu { vcpu: id, source })
    };
    while lifecycle.wait_runnable(id, vcpu.as_mut(), &mut reset) {
        match vcpu.run(&mut handler) {
            Ok(VcpuExit::Io | VcpuExit::Interrupted) => {}
            // Only seen without an in-kernel irqchip, where nothing could wake the vCPU.
            Ok(VcpuExit::Halt) => thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Reset) => lifecycle.request_reset(),
            Ok(VcpuExit::Shutdown) => lifecycle.request_exit(Ok(ExitReason::PowerOff)),
            Ok(VcpuExit::Crash) => {
                let detail = vcpu.crash_detail();
                lifecycle.request_exit(Err(MachineError::GuestCrashed { vcpu: id, detail }));
            }
            Err(source) => lifecycle.request_exit(Err(MachineError::Vcpu { vcpu: id, source })),
        }
    }
}

/// Accounts for a vCPU thread's end however it ends: a panic ends the machine with an error
/// instead of leaving `run` and `pause` waiting for a thread that is gone.
struct VcpuThreadGuard<'a> {
    lifecycle: &'a Lifecycle,
    id: u32,
}

impl Drop for VcpuThreadGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.lifecycle.request_exit(Err(MachineError::VcpuPanicked { vcpu: self.id }));
        }
        let mut control = lock(&self.lifecycle.control);
        control.live_vcpus -= 1;
        self.lifecycle.changed.notify_all();
    }
}

/// Creates the vCPU and loads its start; also returns its power-on state, which a reset
/// goes back to.
fn prepare_vcpu(
    id: u32,
    context: &VcpuContext,
    start: VcpuStart,
) -> Result<(Box<dyn ArchVcpu>, VcpuState), MachineError> {
    let wrap = |source| MachineError::Vcpu { vcpu: id, source };
    let mut vcpu = context.vm.create_vcpu(id).map_err(wrap)?;
    let power_on =
        vcpu.save_state().map_err(|source| MachineError::VcpuState { vcpu: id, source })?;
    match start {
        VcpuStart::Boot => context.board.init_vcpu(id, vcpu.as_mut()).map_err(wrap)?,
        VcpuStart::Restore(state) => vcpu
            .restore_state(&state)
            .map_err(|source| MachineError::VcpuState { vcpu: id, source })?,
    }
    Ok((vcpu, power_on))
}

impl ExitHandler for &IoBuses {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            log::debug!("unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            log::debug!("unclaimed MMIO write at {addr:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;

    #[test]
    fn unclaimed_port_and_mmio_reads_are_all_ones_and_writes_are_dropped() {
        let buses = IoBuses { pio: Bus::new(), mmio: Bus::new() };
        let mut handler: &IoBuses = &buses;
        for len in [1, 2, 4, 8] {
            let mut data = vec![0u8; len];
            handler.pio_read(0x402, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "port read of {len}");
            data.fill(0);
            handler.mmio_read(0xfed4_0000, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "MMIO read of {len}");
        }
        handler.pio_write(0x402, &[1]);
        handler.mmio_write(0xfed4_0000, &[1, 2, 3, 4]);
    }
}
