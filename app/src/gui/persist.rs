//! UI state kept between runs in `$HUTCH_HOME/gui-state.json`: window size and the last
//! view. Its existence also marks "not the first run" (no demo VM is offered again).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::input::PointerMode;
use crate::fsutil::write_atomic;

pub const FILE_NAME: &str = "gui-state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuiState {
    /// Window inner size in logical pixels.
    pub window_width: f32,
    pub window_height: f32,
    /// The VM whose screen was open, if any.
    pub open_vm: Option<String>,
    /// Show the guest screen 1:1 instead of scaled to fit.
    pub one_to_one: bool,
    /// Tablet or grabbed mouse.
    pub pointer_mode: PointerMode,
}

impl Default for GuiState {
    fn default() -> GuiState {
        GuiState {
            window_width: 1024.0,
            window_height: 720.0,
            open_vm: None,
            one_to_one: false,
            pointer_mode: PointerMode::Absolute,
        }
    }
}

pub fn path(root: &Path) -> PathBuf {
    root.join(FILE_NAME)
}

impl GuiState {
    /// The saved state; None when there is none (the first run) — a damaged file counts as
    /// saved, with defaults.
    pub fn load(root: &Path) -> Option<GuiState> {
        let bytes = std::fs::read(path(root)).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap_or_default())
    }

    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(root)?;
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        write_atomic(&path(root), &bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_its_absence_means_first_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("home");
        assert_eq!(GuiState::load(&root), None);
        let state = GuiState {
            window_width: 800.0,
            window_height: 600.0,
            open_vm: Some("web".into()),
            one_to_one: true,
            pointer_mode: PointerMode::Relative,
        };
        state.save(&root).unwrap();
        assert_eq!(GuiState::load(&root), Some(state));
    }

    #[test]
    fn a_damaged_file_still_marks_a_later_run() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(path(tmp.path()), b"{not json").unwrap();
        assert_eq!(GuiState::load(tmp.path()), Some(GuiState::default()));
        std::fs::write(path(tmp.path()), br#"{"one_to_one":true}"#).unwrap();
        assert!(GuiState::load(tmp.path()).unwrap().one_to_one);
        std::fs::write(path(tmp.path()), br#"{"pointer_mode":"relative"}"#).unwrap();
        assert_eq!(GuiState::load(tmp.path()).unwrap().pointer_mode, PointerMode::Relative);
    }
}
