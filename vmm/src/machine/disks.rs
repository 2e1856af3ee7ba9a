//! Disks the machine can switch to new images while paused: a snapshot freezes the current
//! layer and the guest continues on a new overlay. A removable drive (the CD) switches its
//! medium the same way while the guest runs.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::DiskConfig;
use crate::board::BoardError;
use crate::virtio::block::{Block, MediaHandle};

/// The medium of an empty removable drive: no bytes, every access fails.
pub struct EmptyMedium;

impl EmptyMedium {
    fn error(op: &'static str) -> disk::DiskError {
        disk::DiskError::new(disk::DiskErrorKind::OutOfBounds, op)
    }
}

impl disk::BlockBackend for EmptyMedium {
    fn size(&self) -> u64 {
        0
    }
    fn is_writable(&self) -> bool {
        false
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), disk::DiskError> {
        Err(Self::error("read an empty drive"))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), disk::DiskError> {
        Err(Self::error("write an empty drive"))
    }
    fn flush(&self) -> Result<(), disk::DiskError> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), disk::DiskError> {
        Err(Self::error("discard on an empty drive"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), disk::DiskError> {
        Err(Self::error("write an empty drive"))
    }
}

/// Opens what a configured disk holds: its image (any format, by content; foreign formats
/// open read-only, so a VM writes them through a qcow2 overlay), or an empty drive's
/// [`EmptyMedium`].
pub fn open_disk(config: &DiskConfig) -> Result<Box<dyn disk::BlockBackend>, disk::DiskError> {
    if config.is_empty_drive() {
        return Ok(Box::new(EmptyMedium));
    }
    disk::open_image(&config.path, disk::OpenOptions { writable: !config.readonly })
}

/// The machine's removable drive: its switchable backend and what tells the guest.
#[derive(Clone)]
pub struct RemovableDrive {
    pub(crate) disk: SwitchableDisk,
    pub(crate) media: MediaHandle,
}

impl RemovableDrive {
    /// Puts `medium` in the drive (None: ejects), telling the guest.
    pub(crate) fn change(&self, medium: Option<Box<dyn disk::BlockBackend>>) {
        let medium = medium.unwrap_or_else(|| Box::new(EmptyMedium));
        let size = medium.size();
        self.disk.replace(medium);
        self.media.changed(size);
    }
}

/// The disks a board attaches, as it builds them in the configuration's order.
#[derive(Default)]
pub struct AttachedDisks {
    pub disks: Vec<SwitchableDisk>,
    /// The first removable drive; later ones (none today) keep their first medium.
    pub removable: Option<RemovableDrive>,
}

impl AttachedDisks {
    /// Opens disk `index` and makes its virtio-blk device, named for errors and logs; the
    /// board puts it on its bus.
    pub fn open(
        &mut self,
        index: usize,
        config: &DiskConfig,
    ) -> Result<(String, Block), BoardError> {
        let backend = open_disk(config)
            .map_err(|source| BoardError::Disk { path: config.path.clone(), source })?;
        let switchable = SwitchableDisk::new(backend);
        self.disks.push(switchable.clone());
        let name = if config.is_empty_drive() {
            format!("virtio-blk (empty drive {index})")
        } else {
            format!("virtio-blk {}", config.path.display())
        };
        let id = format!("hutch-disk{index}");
        let block = if config.removable {
            let (block, media) = Block::removable(Box::new(switchable.clone()), id)
                .map_err(|e| BoardError::device(name.clone(), e))?;
            if self.removable.is_none() {
                self.removable = Some(RemovableDrive { disk: switchable, media });
            }
            block
        } else {
            Block::new(Box::new(switchable), config.readonly, id)
                .map_err(|e| BoardError::device(name.clone(), e))?
        };
        Ok((name, block))
    }
}

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
