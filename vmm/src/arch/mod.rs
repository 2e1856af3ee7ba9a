//! Architecture-specific platform code. Only x86_64 for now.
pub mod x86_64;
