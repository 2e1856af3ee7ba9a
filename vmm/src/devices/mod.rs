//! Platform devices and the buses they sit on. The PC's own legacy devices (ACPI PM block,
//! i8042, CMOS RTC, the Q35 chipset functions) exist only on x86_64; the 16550 UART and the
//! buses are neutral.
#[cfg(target_arch = "x86_64")]
pub mod acpi_pm;
pub mod bochs_display;
pub mod bus;
pub mod fw_cfg;
#[cfg(target_arch = "x86_64")]
pub mod i8042;
pub mod pflash;
#[cfg(target_arch = "x86_64")]
pub mod q35;
#[cfg(target_arch = "x86_64")]
pub mod rtc;
pub mod serial;
