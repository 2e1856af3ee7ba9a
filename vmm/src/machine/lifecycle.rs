//! The machine's run state shared by its vCPU threads and handles: pause at a safe point,
//! jobs done by every paused vCPU on its own thread (saving state, a reset), a guest's reset
//! request, and the outcome.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{ExitReason, MachineError, RunState};
use crate::devices::bus::lock;
use crate::hypervisor::{ArchVcpu, HypervisorError, VcpuKicker, VcpuState};

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
    /// The guest asked for a reset: the vCPUs park at their next safe point and the machine's
    /// run loop reboots it in place.
    pub(crate) reset_requested: bool,
}

/// What every paused vCPU does on its own thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// Save its state (a snapshot).
    SaveState,
    /// Go back to its power-on state and the board's boot state (a guest's reset).
    Reset,
}

/// One vCPU's part of a job.
pub(crate) enum JobResult {
    Saved(Box<Result<VcpuState, HypervisorError>>),
    Reset(Result<(), MachineError>),
}

/// A job for the paused vCPUs and each one's result, by vCPU id.
pub(crate) struct VcpuJob {
    pub(crate) kind: JobKind,
    pub(crate) results: Mutex<Vec<Option<JobResult>>>,
}

impl VcpuJob {
    /// Does this vCPU's part; `reset` puts it back to its power-on and boot state.
    pub(crate) fn run(
        &self,
        id: u32,
        vcpu: &mut dyn ArchVcpu,
        reset: &mut dyn FnMut(&mut dyn ArchVcpu) -> Result<(), MachineError>,
    ) {
        let result = match self.kind {
            JobKind::SaveState => JobResult::Saved(Box::new(vcpu.save_state())),
            JobKind::Reset => JobResult::Reset(reset(vcpu)),
        };
        if let Some(slot) = lock(&self.results).get_mut(id as usize) {
            *slot = Some(result);
        }
    }

    pub(crate) fn done(&self) -> bool {
        lock(&self.results).iter().all(Option::is_some)
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
                reset_requested: false,
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
        let results = self.run_job(JobKind::SaveState, vcpu_count)?;
        Ok(results
            .into_iter()
            .map(|r| match r {
                Some(JobResult::Saved(state)) => Some(*state),
                _ => None,
            })
            .collect())
    }

    /// Has every paused vCPU reset itself on its own thread; the machine must be paused.
    pub(crate) fn reset_vcpus(&self, vcpu_count: u32) -> Result<(), MachineError> {
        for result in self.run_job(JobKind::Reset, vcpu_count)? {
            match result {
                Some(JobResult::Reset(Err(e))) => return Err(e),
                Some(JobResult::Reset(Ok(()))) => {}
                _ => return Err(MachineError::PauseTimeout),
            }
        }
        Ok(())
    }

    /// Runs a job on every paused vCPU and waits for all of them.
    fn run_job(
        &self,
        kind: JobKind,
        vcpu_count: u32,
    ) -> Result<Vec<Option<JobResult>>, MachineError> {
        let results = Mutex::new((0..vcpu_count).map(|_| None).collect());
        let job = Arc::new(VcpuJob { kind, results });
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
        let results = std::mem::take(&mut *lock(&job.results));
        Ok(results)
    }

    /// A guest's reset: every vCPU parks at its next safe point and the run loop reboots the
    /// machine in place ([`super::Machine::run`]). Ignored once the machine is ending.
    pub(crate) fn request_reset(&self) {
        {
            let mut control = lock(&self.control);
            if control.outcome.is_some() || control.reset_requested {
                return;
            }
            control.reset_requested = true;
            control.pause_requested = true;
            // Pause, resume and snapshots wait for the reboot (they see "starting").
            if control.state == RunState::Running {
                control.state = RunState::Starting;
            }
        }
        self.changed.notify_all();
        self.kick_all();
    }

    /// Waits until every live vCPU is parked (for a reset); false if the machine ends first
    /// or a vCPU does not get there in time.
    pub(crate) fn wait_all_parked(&self) -> bool {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut control = lock(&self.control);
        loop {
            if control.outcome.is_some() {
                return false;
            }
            if control.paused_vcpus >= control.live_vcpus {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            control = self.changed.wait_timeout(control, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The reset is done: the vCPUs run again.
    pub(crate) fn finish_reset(&self) {
        {
            let mut control = lock(&self.control);
            control.reset_requested = false;
            match control.state {
                RunState::Starting => {
                    control.pause_requested = false;
                    control.state = RunState::Running;
                }
                // A pause that got in before the reset request stays.
                RunState::Paused => {}
                _ => control.pause_requested = false,
            }
        }
        self.changed.notify_all();
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

    /// Blocks while the machine is paused, doing any job asked of paused vCPUs (`reset` is
    /// this vCPU's part of a reset); false once the machine is ending.
    pub(crate) fn wait_runnable(
        &self,
        id: u32,
        vcpu: &mut dyn ArchVcpu,
        reset: &mut dyn FnMut(&mut dyn ArchVcpu) -> Result<(), MachineError>,
    ) -> bool {
        let mut control = lock(&self.control);
        let mut counted_paused = false;
        let mut last_job = None;
        loop {
            if let Some(job) = control.job.clone().filter(|_| counted_paused) {
                if last_job != Some(control.job_generation) {
                    last_job = Some(control.job_generation);
                    drop(control);
                    job.run(id, vcpu, reset);
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
