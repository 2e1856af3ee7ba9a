//! Runtime files of running VMs: `$XDG_RUNTIME_DIR/hutch/<key>/control.sock` and
//! `display.shm` (the shared frame), or `/dev/shm/hutch-$UID/<key>/...` without
//! XDG_RUNTIME_DIR (`/tmp/hutch-$UID` if there is no /dev/shm): the frame must live in memory,
//! not on a disk that would be written back at the guest's frame rate. Directories are 0700 and must be
//! ours. `<key>` is `NAME-HASH` (HASH of the VM directory, so two libraries never share a
//! socket), or the bare hash when the name would overflow `sun_path`.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const SOCKET_NAME: &str = "control.sock";
const FRAME_NAME: &str = "display.shm";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("Cannot create the runtime directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Runtime directory {path} is not a directory owned by this user")]
    Untrusted { path: PathBuf },
    #[error("Socket path {path} is too long ({len} bytes, at most {max}); set a shorter XDG_RUNTIME_DIR")]
    TooLong { path: PathBuf, len: usize, max: usize },
}

/// Longest socket path the OS accepts (sun_path minus its NUL).
fn sun_path_max() -> usize {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_path.len() - 1
}

/// `$XDG_RUNTIME_DIR/hutch` when set (and absolute), else `/dev/shm/hutch-$UID`, else
/// `/tmp/hutch-$UID`.
pub fn runtime_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("hutch"),
        _ => {
            // SAFETY: getuid cannot fail and touches no memory.
            let uid = unsafe { libc::getuid() };
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() { shm } else { Path::new("/tmp") };
            base.join(format!("hutch-{uid}"))
        }
    }
}

/// FNV-1a: tiny and stable across Rust releases (a socket path must not change when hutch
/// is rebuilt while a VM runs).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The control socket path of the VM in `vm_dir` named `name`, under `root`.
pub fn socket_path_in(root: &Path, vm_dir: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
    let hash = fnv1a(vm_dir.as_os_str().as_encoded_bytes());
    let max = sun_path_max();
    let named = root.join(format!("{name}-{:08x}", hash >> 32)).join(SOCKET_NAME);
    if named.as_os_str().len() <= max {
        return Ok(named);
    }
    let hashed = root.join(format!("{hash:016x}")).join(SOCKET_NAME);
    let len = hashed.as_os_str().len();
    if len <= max {
        Ok(hashed)
    } else {
        Err(RuntimeError::TooLong { path: hashed, len, max })
    }
}

/// The control socket path of a VM, under [`runtime_root`].
pub fn socket_path(vm_dir: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
    socket_path_in(&runtime_root(), vm_dir, name)
}

/// The shared-memory frame file of the VM whose control socket is `socket` (same directory).
pub fn frame_path_for_socket(socket: &Path) -> PathBuf {
    socket.with_file_name(FRAME_NAME)
}

/// The shared-memory frame file of a VM, under [`runtime_root`].
pub fn frame_path(vm_dir: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
    socket_path(vm_dir, name).map(|s| frame_path_for_socket(&s))
}

/// Creates (0700) the runtime root and the socket's own directory, refusing directories
/// that belong to someone else (`/tmp` is shared).
pub fn prepare_socket_dir(socket: &Path) -> Result<(), RuntimeError> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    if let Some(root) = dir.parent() {
        ensure_private_dir(root)?;
    }
    ensure_private_dir(dir)
}

/// Removes the socket, the frame and their directory (best effort: the VM is going away).
pub fn remove_socket(socket: &Path) {
    let _ = fs::remove_file(socket);
    let _ = fs::remove_file(frame_path_for_socket(socket));
    if let Some(dir) = socket.parent() {
        let _ = fs::remove_dir(dir);
    }
}

fn ensure_private_dir(path: &Path) -> Result<(), RuntimeError> {
    let create_err = |source| RuntimeError::CreateDir { path: path.to_path_buf(), source };
    match DirBuilder::new().recursive(false).mode(0o700).create(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The parent (e.g. a fresh XDG_RUNTIME_DIR/hutch's parent) is missing.
            DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(create_err)?;
            return Ok(());
        }
        Err(e) => return Err(create_err(e)),
    }
    let meta = fs::symlink_metadata(path).map_err(create_err)?;
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid {
        return Err(RuntimeError::Untrusted { path: path.to_path_buf() });
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(create_err)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn short_paths_keep_the_vm_name() {
        let p = socket_path_in(Path::new("/run/user/1000/hutch"), Path::new("/h/vms/web"), "web")
            .unwrap();
        let key = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert!(key.starts_with("web-") && key.len() == 12, "{key}");
        assert!(p.ends_with("control.sock"));
    }

    #[test]
    fn same_name_in_two_libraries_gets_two_sockets() {
        let root = Path::new("/run/user/1000/hutch");
        let a = socket_path_in(root, Path::new("/a/vms/web"), "web").unwrap();
        let b = socket_path_in(root, Path::new("/b/vms/web"), "web").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn long_names_fall_back_to_a_hash_that_fits_sun_path() {
        let name = "n".repeat(64);
        let root = PathBuf::from(format!("/tmp/{}", "r".repeat(30)));
        let p = socket_path_in(&root, Path::new("/x/vms/n"), &name).unwrap();
        assert!(p.as_os_str().len() <= sun_path_max());
        assert!(!p.to_string_lossy().contains(&name));
    }

    #[test]
    fn hopelessly_long_runtime_dirs_are_an_error() {
        let root = PathBuf::from(format!("/{}", "r".repeat(120)));
        assert!(matches!(
            socket_path_in(&root, Path::new("/v"), "v"),
            Err(RuntimeError::TooLong { .. })
        ));
    }

    #[test]
    fn socket_dirs_are_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("hutch/vm-1234/control.sock");
        prepare_socket_dir(&sock).unwrap();
        for dir in [tmp.path().join("hutch"), tmp.path().join("hutch/vm-1234")] {
            assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        }
        // Idempotent, and it tightens a too-open directory of ours.
        fs::set_permissions(tmp.path().join("hutch"), fs::Permissions::from_mode(0o755)).unwrap();
        prepare_socket_dir(&sock).unwrap();
        assert_eq!(fs::metadata(tmp.path().join("hutch")).unwrap().mode() & 0o777, 0o700);
    }
}
