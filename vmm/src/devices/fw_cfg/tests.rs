#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
