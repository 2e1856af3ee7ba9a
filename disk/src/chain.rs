//! The one guard over backing chains: every format that opens a parent (qcow2, VMDK, VHD,
//! VHDX) enters its image here first, so a parent that leads back to a child, or a chain
//! deeper than [`MAX_DEPTH`], is refused instead of recursing forever. The images being
//! opened are kept per thread, so a chain that crosses formats (a qcow2 over a VMDK over a
//! qcow2, through `open_image`) is one chain.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};

use crate::{DiskError, DiskErrorKind};

/// Images deeper in a backing chain than this are refused.
pub(crate) const MAX_DEPTH: usize = 64;

/// Why a backing chain was refused (the source of the [`DiskError`]).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("Backing chain loops back to this image")]
    Loop,
    #[error("Backing chain deeper than {0} images")]
    TooDeep(usize),
}

thread_local! {
    /// The images this thread is opening right now, outermost first, by canonical path.
    static OPENING: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// Marks an image as being opened on this thread until dropped.
#[derive(Debug)]
pub(crate) struct ChainGuard;

/// Enters `path` into the chain of images being opened on this thread; the image stays in it
/// until the guard is dropped (at the end of its `open`, after its parents opened).
pub(crate) fn enter(path: &Path) -> Result<ChainGuard, DiskError> {
    // However the paths were spelled; a path that can't be resolved fails to open anyway.
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    OPENING.with(|opening| {
        let mut opening = opening.borrow_mut();
        if opening.contains(&key) {
            let reason = ChainError::Loop;
            return Err(refused(
                DiskErrorKind::CorruptImage,
                "follow a looping backing chain at",
                reason,
                path,
            ));
        }
        if opening.len() >= MAX_DEPTH {
            let reason = ChainError::TooDeep(MAX_DEPTH);
            return Err(refused(
                DiskErrorKind::UnsupportedFeature,
                "follow a backing chain this deep at",
                reason,
                path,
            ));
        }
        opening.push(key);
        Ok(ChainGuard)
    })
}

fn refused(kind: DiskErrorKind, op: &'static str, reason: ChainError, path: &Path) -> DiskError {
    DiskError { source: Some(io::Error::other(reason)), ..DiskError::new(kind, op) }.with_path(path)
}

impl Drop for ChainGuard {
    fn drop(&mut self) {
        OPENING.with(|opening| {
            opening.borrow_mut().pop();
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn a_path_already_being_opened_is_a_loop_however_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let guard = enter(&a).unwrap();
        let again = enter(&dir.path().join(".").join("a")).unwrap_err();
        assert_eq!(again.kind(), DiskErrorKind::CorruptImage);
        assert!(again.source().unwrap().to_string().contains("loops"), "{again}");
        drop(guard);
        assert!(enter(&a).is_ok());
    }

    #[test]
    fn a_loop_through_two_formats_is_refused_with_one_error() {
        use crate::qcow2::Qcow2;
        use crate::{open_image, ImageFormat, OpenOptions};

        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.vmdk");
        let vmdk = "# Disk DescriptorFile\nCID=1\nparentCID=1\nparentFileNameHint=\"a.qcow2\"\nRW 2048 ZERO\n";
        std::fs::write(&b, vmdk).unwrap();
        let backing = Some((Path::new("b.vmdk"), ImageFormat::Vmdk));
        let created = Qcow2::create(&a, 1 << 20, backing, 64 << 10);
        // Creating opens the new image, which already follows the loop.
        assert_eq!(created.unwrap_err().kind(), DiskErrorKind::CorruptImage);
        for start in [&a, &b] {
            let Err(e) = open_image(start, OpenOptions::default()) else {
                panic!("{} opened although its chain loops", start.display());
            };
            assert_eq!(e.kind(), DiskErrorKind::CorruptImage, "{e}");
            assert!(e.to_string().contains("looping backing chain"), "{e}");
            assert_eq!(e.path(), Some(start.as_path()), "{e}");
        }
    }

    #[test]
    fn a_chain_deeper_than_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let guards: Vec<ChainGuard> =
            (0..MAX_DEPTH).map(|i| enter(&dir.path().join(i.to_string())).unwrap()).collect();
        let deep = enter(&dir.path().join("last")).unwrap_err();
        assert_eq!(deep.kind(), DiskErrorKind::UnsupportedFeature);
        drop(guards);
        assert!(enter(&dir.path().join("last")).is_ok());
    }
}
