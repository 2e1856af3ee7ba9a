//! Window coordinates → guest pointer coordinates.

/// Largest absolute pointer coordinate (the tablet's axis range is 0..=ABS_MAX).
pub const ABS_MAX: u16 = 0x7fff;
