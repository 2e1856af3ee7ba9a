//! Legacy platform devices and the buses they sit on.
pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod rtc;
pub mod serial;
