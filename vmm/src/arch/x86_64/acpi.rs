//! (being written)
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("x")]
    X,
}
