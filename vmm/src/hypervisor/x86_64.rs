//! x86_64 vCPU registers: the extension of [`Vcpu`] that x86 boards and boot code use.

use serde::{Deserialize, Serialize};

use super::{Result, Vcpu};

/// Register access of an x86_64 vCPU.
pub trait VcpuX86_64: Vcpu {
    fn regs(&self) -> Result<X86Regs>;
    fn set_regs(&mut self, regs: &X86Regs) -> Result<()>;
    fn sregs(&self) -> Result<X86Sregs>;
    fn set_sregs(&mut self, sregs: &X86Sregs) -> Result<()>;

    /// Where the vCPU stood when it crashed ([`super::VcpuExit::Crash`]), for the error.
    fn crash_detail(&self) -> String {
        match self.regs() {
            Ok(regs) => format!("triple-faulted near rip {:#x}", regs.rip),
            Err(_) => "triple-faulted".to_string(),
        }
    }
}

/// The typed registers of a saved x86_64 vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86VcpuRegs {
    pub regs: X86Regs,
    pub sregs: X86Sregs,
}

/// General-purpose registers of an x86_64 vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register as the hardware caches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers of an x86_64 vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86Sregs {
    pub cs: X86Segment,
    pub ds: X86Segment,
    pub es: X86Segment,
    pub fs: X86Segment,
    pub gs: X86Segment,
    pub ss: X86Segment,
    pub tr: X86Segment,
    pub ldt: X86Segment,
    pub gdt: X86DescriptorTable,
    pub idt: X86DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}
