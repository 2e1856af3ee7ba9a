//! The flash image on disk: loading and checking it, replacing it whole and crash-safely,
//! and making a VM's copy of the firmware's template.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::path::Path;

use super::{PflashError, BLOCK_SIZE, MAX_FLASH_BYTES};
use crate::fsutil::{parent_dir, sync_dir, temp_path, write_atomic_with};

/// Reads a whole flash image after checking its size: not empty, a multiple of the block
/// size, not absurdly large. With `writable`, also checks that the file may be written, so a
/// VM whose variables could not be kept fails at start rather than at the first flush.
pub(super) fn load(
    path: &Path,
    writable: bool,
) -> Result<(Vec<u8>, Option<Permissions>), PflashError> {
    let open_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => PflashError::NotFound { path: path.to_path_buf() },
        _ => PflashError::Open { path: path.to_path_buf(), source },
    };
    let not_a_file = || PflashError::Open {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
    };
    // Checked before opening too: opening a FIFO would block.
    if !fs::metadata(path).map_err(open_err)?.is_file() {
        return Err(not_a_file());
    }
    let file = OpenOptions::new().read(true).write(writable).open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    check_size(path, meta.len())?;
    let mut contents = Vec::with_capacity(meta.len() as usize);
    // Bounded: a file that grows while it is read must not make the read unbounded.
    file.take(MAX_FLASH_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(|source| PflashError::Read { path: path.to_path_buf(), source })?;
    // The file may have changed between the metadata and the read.
    check_size(path, contents.len() as u64)?;
    Ok((contents, writable.then(|| meta.permissions())))
}

fn check_size(path: &Path, size: u64) -> Result<(), PflashError> {
    if size == 0 {
        return Err(PflashError::Empty { path: path.to_path_buf() });
    }
    if size > MAX_FLASH_BYTES {
        return Err(PflashError::TooLarge { path: path.to_path_buf(), size, max: MAX_FLASH_BYTES });
    }
    if !size.is_multiple_of(BLOCK_SIZE) {
        return Err(PflashError::NotWholeBlocks {
            path: path.to_path_buf(),
            size,
            block: BLOCK_SIZE,
        });
    }
    Ok(())
}

/// Replaces `path` with `contents`, keeping `permissions`: after a crash at any point the
/// file holds the old or the new contents whole ([`write_atomic_with`]).
pub(super) fn replace(
    path: &Path,
    contents: &[u8],
    permissions: Option<&Permissions>,
) -> Result<(), PflashError> {
    write_atomic_with(path, |file| {
        file.write_all(contents)?;
        match permissions {
            Some(p) => file.set_permissions(p.clone()),
            None => Ok(()),
        }
    })
    .map_err(|source| PflashError::Write { path: path.to_path_buf(), source })
}

/// Copies `template` to `dest` unless `dest` exists; true when it made the copy. The copy
/// appears whole or not at all, and an existing `dest` (the user's variables) is never
/// replaced, not even by a racing creator: the temp file is hard-linked into place.
pub(super) fn create_from_template(template: &Path, dest: &Path) -> Result<bool, PflashError> {
    if dest.exists() {
        return Ok(false);
    }
    let (contents, _) = load(template, false)?;
    let write_err = |source: io::Error| PflashError::Write { path: dest.to_path_buf(), source };
    let tmp = temp_path(dest).map_err(write_err)?;
    if let Err(e) = write_synced(&tmp, &contents) {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    let placed = match fs::hard_link(&tmp, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: rename, after checking again (the VM lock keeps
        // other creators out).
        Err(_) if !dest.exists() => fs::rename(&tmp, dest).map(|()| true),
        Err(_) => Ok(false),
    };
    let _ = fs::remove_file(&tmp);
    let created = placed.map_err(write_err)?;
    if created {
        sync_dir(parent_dir(dest));
    }
    Ok(created)
}

fn write_synced(tmp: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()
}
