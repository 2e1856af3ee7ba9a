//! Small filesystem helpers: crash-safe whole-file writes (shared with the VMM) and reading
//! the tail of a log.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

pub use vmm::fsutil::{write_atomic, write_atomic_with};

/// The last `max_lines` lines of a text file (at most the last 64 KiB are read).
pub fn tail_lines(path: &Path, max_lines: usize) -> io::Result<Vec<String>> {
    const MAX_READ: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX_READ)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(max_lines);
    Ok(lines[start..].iter().map(|l| l.to_string()).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn tail_returns_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hutch.log");
        std::fs::write(&path, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&path, 2).unwrap(), vec!["c", "d"]);
        assert_eq!(tail_lines(&path, 10).unwrap(), vec!["a", "b", "c", "d"]);
    }
}
