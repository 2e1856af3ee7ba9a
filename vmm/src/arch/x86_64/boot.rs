//! (being written)
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("x")]
    X,
}
