//! aarch64 vCPU registers: the extension of [`Vcpu`] an aarch64 board will use.

use serde::{Deserialize, Serialize};

use super::{Result, Vcpu};

/// Register access of an aarch64 vCPU.
pub trait VcpuAarch64: Vcpu {
    fn core_regs(&self) -> Result<Aarch64CoreRegs>;
    fn set_core_regs(&mut self, regs: &Aarch64CoreRegs) -> Result<()>;

    /// Where the vCPU stood when it crashed ([`super::VcpuExit::Crash`]), for the error.
    fn crash_detail(&self) -> String {
        match self.core_regs() {
            Ok(regs) => format!("crashed near pc {:#x}", regs.pc),
            Err(_) => "crashed".to_string(),
        }
    }
}

/// The core registers of an aarch64 vCPU (AArch64 state): x0-x30, SP_EL1, PC, PSTATE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aarch64CoreRegs {
    pub x: [u64; 31],
    pub sp: u64,
    pub pc: u64,
    pub pstate: u64,
}
