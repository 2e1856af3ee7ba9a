//! Disk images: formats, detection, conversion, OVA. For now: raw image files.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}
