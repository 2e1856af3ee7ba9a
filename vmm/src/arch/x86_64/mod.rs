//! The x86_64 PC: address map, Linux boot, ACPI tables.
pub mod acpi;
pub mod acpi_fw;
pub mod aml;
pub mod boot;
pub mod kernel_cache;
pub mod layout;
