//! Architecture-specific platform code, each compiled only for its own target: boot
//! protocols, address maps, firmware tables. Boards (`crate::board`) put it to use.
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
