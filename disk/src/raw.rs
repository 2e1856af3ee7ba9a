//! Raw disk images: the file's bytes are the disk's bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use crate::mapped::FileHoles;
use crate::{check_range, sys, BlockBackend, DiskError, Extent};

/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux and macOS).
const MAX_IOVECS: usize = 1024;
/// Chunk size when zeroes have to be written as data.
const ZERO_CHUNK: usize = 64 * 1024;

/// A raw image file (or host block device).
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
}

impl std::fmt::Debug for RawFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("writable", &self.writable)
            .finish()
    }
}

impl RawFile {
    /// Opens `path`; its current length is the disk size.
    pub fn open(path: &Path, read_only: bool) -> Result<RawFile, DiskError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| DiskError::io("open", e).with_path(path))?;
        // Seeking (not metadata) also gives the size of a host block device.
        let size =
            file.seek(SeekFrom::End(0)).map_err(|e| DiskError::io("open", e).with_path(path))?;
        Ok(RawFile { file, path: path.to_path_buf(), size, writable: !read_only })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, offset: u64, e: io::Error) -> DiskError {
        DiskError::io(op, e).with_path(&self.path).with_offset(offset)
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, len, op).map_err(|e| e.with_path(&self.path))
    }

    fn check_write(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        if !self.writable {
            let e = io::Error::from(io::ErrorKind::PermissionDenied);
            return Err(self.err(op, offset, e));
        }
        self.check(op, offset, len)
    }

    /// Runs preadv/pwritev over `bufs` until all bytes moved, resuming after short transfers.
    fn vectored(
        &self,
        op: &'static str,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        write: bool,
    ) -> Result<(), DiskError> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if write {
            self.check_write(op, offset, total)?;
        } else {
            self.check(op, offset, total)?;
        }
        // The guards keep the slices' host pointers valid while the iovecs use them.
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .filter(|(_, b)| !b.is_empty())
            .map(|(g, b)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: b.len() })
            .collect();
        let mut first = 0;
        let mut pos = offset;
        while first < iovecs.len() {
            let batch = &iovecs[first..iovecs.len().min(first + MAX_IOVECS)];
            let Ok(file_off) = libc::off_t::try_from(pos) else {
                return Err(self.err(op, pos, io::Error::from(io::ErrorKind::InvalidInput)));
            };
            // SAFETY: every iovec points into guest memory that `bufs` borrows for this call
            // (kept mapped by `guards`) and covers exactly that slice's length; the fd is owned
            // by `self.file`. The kernel reads or writes only within those ranges.
            let ret = unsafe {
                if write {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        file_off,
                    )
                } else {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        file_off,
                    )
                }
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err(op, pos, e));
            }
            if ret == 0 {
                // The file shrank under us.
                return Err(self.err(op, pos, io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            let mut done = ret as usize;
            pos += done as u64;
            while done > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                if done >= iov.iov_len {
                    done -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `done < iov_len`, so the advanced pointer stays inside the slice.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                    iov.iov_len -= done;
                    done = 0;
                }
            }
        }
        drop(guards);
        Ok(())
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.check("read", offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(|e| self.err("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_write("write", offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| self.err("write", offset, e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_all().map_err(|e| DiskError::io("flush", e).with_path(&self.path))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write("discard", offset, len)?;
        match sys::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            // Discard is a hint: a file system without holes just keeps the data.
            Err(e) if sys::is_unsupported(&e) => Ok(()),
            Err(e) => Err(self.err("discard", offset, e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write("write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match sys::zero_range(&self.file, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if sys::is_unsupported(&e) => {}
            Err(e) => return Err(self.err("write zeroes", offset, e)),
        }
        match sys::punch_hole(&self.file, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if sys::is_unsupported(&e) => {}
            Err(e) => return Err(self.err("write zeroes", offset, e)),
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], pos)
                .map_err(|e| self.err("write zeroes", pos, e))?;
            pos += n as u64;
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), DiskError> {
        self.vectored("read", bufs, offset, false)
    }

    /// The file's holes are Zero: a sparse raw image (`truncate -s 16G`) converts without
    /// reading gigabytes of zeroes. Block devices and file systems without SEEK_DATA are all
    /// data.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.check("map", offset, len)?;
        let mut out = Vec::new();
        FileHoles::new(&self.file).push(&mut out, offset, offset, len);
        Ok(out)
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), DiskError> {
        self.vectored("write", bufs, offset, true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::DiskErrorKind;
    use std::io::Write;

    fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let err = RawFile::open(Path::new("/nonexistent/hutch-disk.img"), true).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::Io);
        assert!(err.to_string().contains("/nonexistent/hutch-disk.img"), "{err}");
        assert!(err.to_string().contains("open"), "{err}");
    }

    #[test]
    fn reads_and_writes_reach_the_file() {
        let f = image(&[1u8; 4096]);
        let disk = RawFile::open(f.path(), false).unwrap();
        assert_eq!(disk.size(), 4096);
        disk.write_at(&[9, 8, 7], 100).unwrap();
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 99).unwrap();
        assert_eq!(buf, [1, 9, 8, 7]);
        disk.flush().unwrap();
        assert_eq!(&std::fs::read(f.path()).unwrap()[99..104], &[1, 9, 8, 7, 1]);
    }

    #[test]
    fn accesses_past_the_end_are_out_of_bounds() {
        let f = image(&[0u8; 512]);
        let disk = RawFile::open(f.path(), false).unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(disk.read_at(&mut buf, 511).unwrap_err().kind(), DiskErrorKind::OutOfBounds);
        assert_eq!(disk.write_at(&buf, u64::MAX).unwrap_err().kind(), DiskErrorKind::OutOfBounds);
        assert_eq!(disk.write_zeroes(256, 512).unwrap_err().kind(), DiskErrorKind::OutOfBounds);
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let f = image(&[0u8; 512]);
        let disk = RawFile::open(f.path(), true).unwrap();
        assert!(!disk.is_writable());
        assert!(disk.write_at(&[1], 0).is_err());
        assert!(disk.discard(0, 512).is_err());
    }

    #[test]
    fn holes_map_as_zero_and_a_sparse_image_converts_without_reading_them() {
        use crate::convert::{convert, ConvertOptions};
        use crate::ExtentKind::{Data, Zero};
        const GIB: u64 = 1 << 30;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(16 * GIB).unwrap();
        f.as_file().write_all_at(&[7u8; 65536], GIB).unwrap();
        let disk = RawFile::open(f.path(), true).unwrap();
        let map: Vec<_> =
            disk.extents(0, 2 * GIB).unwrap().iter().map(|e| (e.offset, e.len, e.kind)).collect();
        if map.len() == 1 {
            crate::skip_without("does not report holes");
            return;
        }
        assert_eq!(map, [(0, GIB, Zero), (GIB, 65536, Data), (GIB + 65536, GIB - 65536, Zero)]);
        // A window inside the data, and past the end.
        assert_eq!(disk.extents(GIB + 4096, 4096).unwrap()[0].kind, Data);
        assert!(disk.extents(16 * GIB - 1, 2).is_err());

        let out = tempfile::NamedTempFile::new().unwrap();
        out.as_file().set_len(16 * GIB).unwrap();
        let dst = RawFile::open(out.path(), false).unwrap();
        let stats = convert(&disk, &dst, &ConvertOptions::default(), &|_, _| true).unwrap();
        assert_eq!((stats.read, stats.written, stats.sparse), (65536, 65536, 16 * GIB - 65536));
        let mut back = vec![0u8; 65536];
        dst.read_at(&mut back, GIB).unwrap();
        assert!(back.iter().all(|&b| b == 7));
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_range() {
        let f = image(&[0xaau8; 3 * 4096]);
        let disk = RawFile::open(f.path(), false).unwrap();
        disk.write_zeroes(4096, 4096).unwrap();
        disk.discard(0, 4096).unwrap();
        let data = std::fs::read(f.path()).unwrap();
        assert_eq!(data.len(), 3 * 4096);
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[8192..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn vectored_io_moves_data_between_slices_and_file() {
        let contents: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let f = image(&contents);
        let disk = RawFile::open(f.path(), false).unwrap();
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 3000];
        {
            let sa = VolatileSlice::from(a.as_mut_slice());
            let sb = VolatileSlice::from(b.as_mut_slice());
            disk.read_vectored_at(&[sa, sb], 10).unwrap();
        }
        assert_eq!(a, contents[10..110]);
        assert_eq!(b, contents[110..3110]);
        let mut w = vec![0x55u8; 700];
        disk.write_vectored_at(&[VolatileSlice::from(w.as_mut_slice())], 8192 - 700).unwrap();
        assert!(std::fs::read(f.path()).unwrap()[8192 - 700..].iter().all(|&x| x == 0x55));
        let mut past = vec![0u8; 2];
        let err =
            disk.read_vectored_at(&[VolatileSlice::from(past.as_mut_slice())], 8191).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::OutOfBounds);
    }
}
