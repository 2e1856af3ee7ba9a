//! virtio-rng / entropy device (virtio 1.2 section 5.4), fed from the host's /dev/urandom.

mod device;
mod persist;

pub use device::Rng;
pub use persist::RngState;

#[derive(Debug, thiserror::Error)]
pub enum VirtioRngError {
    #[error("Could not open the host random source {path}")]
    Open {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}
