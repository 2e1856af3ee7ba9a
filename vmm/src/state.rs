//! Saved device state for snapshots: the error every device's save/restore reports, and the
//! one binary codec (bincode) all saved state goes through.
//!
//! Each device owns a plain serde struct of its state next to its code (`SerialDeviceState`
//! in `devices/serial/persist.rs`, ...). Saved state comes from a file and is untrusted: a device
//! checks it before it changes anything, and a refused restore leaves the device as it was.

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device cannot be saved (yet): the snapshot fails, naming it.
    #[error("Device {device} cannot be saved in a snapshot: {reason}")]
    NotSnapshottable { device: String, reason: String },
    /// Saved state that does not fit this device (wrong kind, sizes, out-of-range values).
    #[error("Saved state of {device} is invalid: {reason}")]
    Invalid { device: String, reason: String },
    /// Saved state the device's own checks refused, with their error.
    #[error("Saved state of {device} does not fit it")]
    Rejected {
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The saved state could not be encoded or decoded.
    #[error("Saved state of {device} could not be {action}")]
    Codec {
        device: String,
        action: &'static str,
        #[source]
        source: bincode::Error,
    },
}

impl StateError {
    pub fn invalid(device: impl Into<String>, reason: impl Into<String>) -> StateError {
        StateError::Invalid { device: device.into(), reason: reason.into() }
    }

    pub fn rejected(
        device: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StateError {
        StateError::Rejected { device: device.into(), source: source.into() }
    }

    pub fn not_snapshottable(device: impl Into<String>, reason: impl Into<String>) -> StateError {
        StateError::NotSnapshottable { device: device.into(), reason: reason.into() }
    }
}

/// Largest state one device may decode from (bounds bincode's allocations on a lying length).
pub const MAX_DEVICE_STATE_BYTES: u64 = 256 << 20;

/// Encodes a device's state struct.
pub fn encode<T: Serialize>(device: &str, value: &T) -> Result<Vec<u8>, StateError> {
    bincode::serialize(value).map_err(|source| StateError::Codec {
        device: device.to_string(),
        action: "encoded",
        source,
    })
}

/// Decodes a device's state struct, refusing trailing bytes and oversized claims.
pub fn decode<T: DeserializeOwned>(device: &str, bytes: &[u8]) -> Result<T, StateError> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(MAX_DEVICE_STATE_BYTES)
        .deserialize(bytes)
        .map_err(|source| StateError::Codec {
            device: device.to_string(),
            action: "decoded",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn state_round_trips_through_the_codec() {
        let s = Sample { a: 7, b: vec![1, 2, 3] };
        let bytes = encode("sample", &s).unwrap();
        assert_eq!(decode::<Sample>("sample", &bytes).unwrap(), s);
    }

    #[test]
    fn trailing_bytes_and_lying_lengths_are_refused() {
        let mut bytes = encode("sample", &Sample { a: 1, b: vec![] }).unwrap();
        bytes.push(0);
        assert!(decode::<Sample>("sample", &bytes).is_err());
        // A vector claiming 2^60 elements must fail, not allocate.
        let mut lying = 1u32.to_le_bytes().to_vec();
        lying.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<Sample>("sample", &lying).is_err());
    }
}
