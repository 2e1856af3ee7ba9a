//! Disks the machine can switch to new images while paused: a snapshot freezes the current
//! layer and the guest continues on a new overlay.

use std::sync::{Arc, RwLock, RwLockReadGuard};

/// A disk whose image can be swapped while the machine is paused (a snapshot freezes the
/// current layer and continues on a new overlay).
#[derive(Clone)]
pub struct SwitchableDisk(Arc<RwLock<Box<dyn disk::BlockBackend>>>);

impl SwitchableDisk {
    pub fn new(backend: Box<dyn disk::BlockBackend>) -> Self {
        SwitchableDisk(Arc::new(RwLock::new(backend)))
    }

    fn read(&self) -> RwLockReadGuard<'_, Box<dyn disk::BlockBackend>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn replace(&self, new: Box<dyn disk::BlockBackend>) -> Box<dyn disk::BlockBackend> {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *guard, new)
    }
}

impl disk::BlockBackend for SwitchableDisk {
    fn size(&self) -> u64 {
        self.read().size()
    }
    fn is_writable(&self) -> bool {
        self.read().is_writable()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), disk::DiskError> {
        self.read().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), disk::DiskError> {
        self.read().write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), disk::DiskError> {
        self.read().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), disk::DiskError> {
        self.read().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), disk::DiskError> {
        self.read().write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<disk::Extent>, disk::DiskError> {
        self.read().extents(offset, len)
    }
    fn read_vectored_at(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), disk::DiskError> {
        self.read().read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), disk::DiskError> {
        self.read().write_vectored_at(bufs, offset)
    }
}
