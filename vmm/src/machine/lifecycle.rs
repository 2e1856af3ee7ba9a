//! The machine's run state shared by its vCPU threads and handles: pause at a safe point,
//! jobs done by every paused vCPU on its own thread (saving state), and the outcome.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{ExitReason, MachineError, RunState};
use crate::devices::bus::lock;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuKicker, VcpuState};

/// How long `pause` (and a job) waits for every vCPU to reach a safe point.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The machine's run state and its outcome, shared by the vCPU threads and the handles.
pub(crate) struct Control {
    pub(crate) state: RunState,
    pub(crate) outcome: Option<Result<ExitReason, MachineError>>,
    pub(crate) pause_requested: bool,
    pub(crate) paused_vcpus: u32,
    pub(crate) live_vcpus: u32,
    /// Work every paused vCPU does on its own thread (a vCPU is bound to it): saving state.
    pub(crate) job: Option<Arc<VcpuJob>>,
    /// Counts jobs, so a vCPU that stays paused across two jobs does both.
    pub(crate) job_generation: u64,
}

/// Saves each paused vCPU's state on its own thread.
pub(crate) struct VcpuJob {
    pub(crate) states: Mutex<Vec<Option<Result<VcpuState, HypervisorError>>>>,
}

impl VcpuJob {
    pub(crate) fn run(&self, id: u32, vcpu: &dyn Vcpu) {
        let state = vcpu.save_state();
        if let Some(slot) = lock(&self.states).get_mut(id as usize) {
            *slot = Some(state);
        }
    }

    pub(crate) fn done(&self) -> bool {
        lock(&self.states).iter().all(Option::is_some)
    }
}

pub(crate) struct Lifecycle {
    pub(crate) control: Mutex<Control>,
    pub(crate) changed: Condvar,
    pub(crate) kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    pub(crate) started: Instant,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Self {
            control: Mutex::new(Control {
                state: RunState::Starting,
                outcome: None,
                pause_requested: false,
                paused_vcpus: 0,
                live_vcpus: 0,
                job: None,
                job_generation: 0,
            }),
            changed: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    pub(crate) fn state(&self) -> RunState {
        lock(&self.control).state
    }

    /// Stops all vCPUs at a safe point (between two exits) and waits until they are there.
    /// The state reads `paused` only once every vCPU has stopped.
    pub(crate) fn pause(&self) -> Result<(), MachineError> {
        {
            let mut control = lock(&self.control);
            match control.state {
                RunState::Running => {}
                RunState::Paused => return Ok(()),
                other => return Err(MachineError::InvalidState(other)),
            }
            control.pause_requested = true;
        }
        self.kick_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut control = lock(&self.control);
        loop {
            if control.outcome.is_some() {
                return Err(MachineError::InvalidState(RunState::ShuttingDown));
            }
            if !control.pause_requested {
                // A resume came first.
                return Err(MachineError::InvalidState(RunState::Running));
            }
            if control.paused_vcpus >= control.live_vcpus {
                control.state = RunState::Paused;
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                control.pause_requested = false;
                self.changed.notify_all();
                return Err(MachineError::PauseTimeout);
            }
            control = self.changed.wait_timeout(control, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    pub(crate) fn resume(&self) -> Result<(), MachineError> {
        let mut control = lock(&self.control);
        match control.state {
            RunState::Paused => {
                control.pause_requested = false;
                control.state = RunState::Running;
                self.changed.notify_all();
                Ok(())
            }
            RunState::Running => {
                // Cancels a pause still waiting for its vCPUs.
                control.pause_requested = false;
                self.changed.notify_all();
                Ok(())
            }
            other => Err(MachineError::InvalidState(other)),
        }
    }

    /// Has every paused vCPU save its state on its own thread; the machine must be paused.
    pub(crate) fn save_vcpus(
        &self,
        vcpu_count: u32,
    ) -> Result<Vec<Option<Result<VcpuState, HypervisorError>>>, MachineError> {
        let job = Arc::new(VcpuJob { states: Mutex::new((0..vcpu_count).map(|_| None).collect()) });
        {
            let mut control = lock(&self.control);
            control.job = Some(job.clone());
            control.job_generation += 1;
            self.changed.notify_all();
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            while !job.done() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || control.outcome.is_some() {
                    control.job = None;
                    return Err(MachineError::PauseTimeout);
                }
                control =
                    self.changed.wait_timeout(control, left).unwrap_or_else(|p| p.into_inner()).0;
            }
            control.job = None;
        }
        let states = std::mem::take(&mut *lock(&job.states));
        Ok(states)
    }

    /// Records how the machine ends (the first outcome wins) and gets every vCPU out.
    pub(crate) fn request_exit(&self, outcome: Result<ExitReason, MachineError>) {
        {
            let mut control = lock(&self.control);
            if control.outcome.is_none() {
                if let Err(e) = &outcome {
                    log::error!("machine stopping: {}", crate::error_chain(e));
                }
                control.outcome = Some(outcome);
                control.state = RunState::ShuttingDown;
            }
        }
        self.changed.notify_all();
        self.kick_all();
    }

    pub(crate) fn kick_all(&self) {
        for kicker in lock(&self.kickers).iter() {
            kicker.kick();
        }
    }

    /// Blocks while the machine is paused, doing any job asked of paused vCPUs; false once
    /// the machine is ending.
    pub(crate) fn wait_runnable(&self, id: u32, vcpu: &dyn Vcpu) -> bool {
        let mut control = lock(&self.control);
        let mut counted_paused = false;
        let mut last_job = None;
        loop {
            if let Some(job) = control.job.clone().filter(|_| counted_paused) {
                if last_job != Some(control.job_generation) {
                    last_job = Some(control.job_generation);
                    drop(control);
                    job.run(id, vcpu);
                    self.changed.notify_all();
                    control = lock(&self.control);
                    continue;
                }
            }
            if control.outcome.is_some() {
                if counted_paused {
                    control.paused_vcpus -= 1;
                }
                return false;
            }
            if !control.pause_requested {
                if counted_paused {
                    control.paused_vcpus -= 1;
                }
                return true;
            }
            if !counted_paused {
                control.paused_vcpus += 1;
                counted_paused = true;
                self.changed.notify_all();
            }
            control = self.changed.wait(control).unwrap_or_else(|p| p.into_inner());
        }
    }
}
