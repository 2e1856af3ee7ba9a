//! The virtio-gpu device: the 2D command set on the control queue, the cursor queue, the
//! configuration space with its display-change event, and the handle the host uses to offer a
//! new display size.
//!
//! Every request is untrusted: sizes, offsets and rectangles are checked with checked
//! arithmetic and answered with the matching `VIRTIO_GPU_RESP_ERR_*`; commands complete
//! synchronously, so a fenced command is answered with its fence already signalled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use display::{CursorImage, Image, PixelFormat, Rect, ScanoutSink, SourceId};
use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::edid::edid;
use super::{GpuCursorState, GpuResourceState, GpuState};
use crate::devices::bus::lock;
use crate::memory::slots::HostMemory;
use crate::memory::GuestMemory;
use crate::pci::config::CLASS_DISPLAY_VGA;
use crate::state::{self, StateError};
use crate::virtio::queue::{copy_from_slices, copy_to_slices, drain_queue, map_chain};
use crate::virtio::{
    RestoredQueues, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_GPU, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: [u16; 2] = [256, 16];
const CONTROL_QUEUE: usize = 0;
const CURSOR_QUEUE: usize = 1;

const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
const EVENT_DISPLAY: u32 = 1;

// Command and response types (virtio 1.2 section 5.7.6.7).
const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
const CMD_RESOURCE_UNREF: u32 = 0x0102;
const CMD_SET_SCANOUT: u32 = 0x0103;
const CMD_RESOURCE_FLUSH: u32 = 0x0104;
const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
const CMD_GET_EDID: u32 = 0x010a;
const CMD_UPDATE_CURSOR: u32 = 0x0300;
const CMD_MOVE_CURSOR: u32 = 0x0301;
const RESP_OK_NODATA: u32 = 0x1100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const RESP_OK_EDID: u32 = 0x1104;
const RESP_ERR_UNSPEC: u32 = 0x1200;
const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

const FLAG_FENCE: u32 = 1;
const FLAG_INFO_RING_IDX: u32 = 2;

const HDR_SIZE: usize = 24;
const MAX_SCANOUTS: usize = 16;
const DISPLAY_INFO_SIZE: usize = HDR_SIZE + MAX_SCANOUTS * 24;
const EDID_RESP_SIZE: usize = HDR_SIZE + 8 + 1024;
const MEM_ENTRY_SIZE: usize = 16;

/// Host memory all resources together may take.
const MAX_RESOURCE_BYTES: u64 = 256 << 20;
/// Largest resource dimension: twice the largest screen (room for a virtual desktop).
const MAX_RESOURCE_WIDTH: u32 = display::MAX_WIDTH * 2;
const MAX_RESOURCE_HEIGHT: u32 = display::MAX_HEIGHT * 2;
/// Most backing entries one resource may have (a 4K frame in 4 KiB pages needs ~8100).
const MAX_BACKING_ENTRIES: u32 = 1 << 16;
/// Largest cursor image accepted (the protocol's cursors are 64×64).
const MAX_CURSOR_SIZE: u32 = 256;
const BYTES_PER_PIXEL: u32 = 4;
/// Smallest display size offered to the guest.
const MIN_DISPLAY: (u32, u32) = (640, 480);

/// Why saved state does not fit the device (checked like the commands that made it).
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("Activity differs from the transport's")]
    ActivityMismatch,
    #[error("Resource {0} has an unknown pixel format")]
    ResourceFormat(u32),
    #[error("Resource id {0} is invalid or repeated")]
    ResourceId(u32),
    #[error("Resource {0} has an absurd size")]
    ResourceSize(u32),
    #[error("Resource {0} pixels do not fit its size")]
    ResourcePixels(u32),
    #[error("Resource {0} has too many backing entries")]
    BackingEntries(u32),
    #[error("Resource {0} backing is outside guest memory")]
    BackingOutsideMemory(u32),
    #[error("Scanout shows a missing resource or lies outside it")]
    Scanout,
    #[error("Unknown cursor format")]
    CursorFormat,
    #[error("Cursor image of an absurd size")]
    CursorSize,
    #[error("{0} queues, not {n}", n = QUEUE_SIZES.len())]
    QueueCount(usize),
}

/// A virtio-gpu pixel format code, if it is one of the 32-bit formats.
fn pixel_format(code: u32) -> Option<PixelFormat> {
    Some(match code {
        1 => PixelFormat::B8G8R8A8,
        2 => PixelFormat::B8G8R8X8,
        3 => PixelFormat::A8R8G8B8,
        4 => PixelFormat::X8R8G8B8,
        67 => PixelFormat::R8G8B8A8,
        68 => PixelFormat::X8B8G8R8,
        121 => PixelFormat::A8B8G8R8,
        134 => PixelFormat::R8G8B8X8,
        _ => return None,
    })
}

/// The virtio-gpu code of a pixel format (the inverse of [`pixel_format`]).
fn format_code(format: PixelFormat) -> u32 {
    match format {
        PixelFormat::B8G8R8A8 => 1,
        PixelFormat::B8G8R8X8 => 2,
        PixelFormat::A8R8G8B8 => 3,
        PixelFormat::X8R8G8B8 => 4,
        PixelFormat::R8G8B8A8 => 67,
        PixelFormat::X8B8G8R8 => 68,
        PixelFormat::A8B8G8R8 => 121,
        PixelFormat::R8G8B8X8 => 134,
    }
}

fn clamp_display(width: u32, height: u32) -> (u32, u32) {
    (
        width.clamp(MIN_DISPLAY.0, display::MAX_WIDTH),
        height.clamp(MIN_DISPLAY.1, display::MAX_HEIGHT),
    )
}

/// State shared between the device and its [`GpuHandle`]s.
struct Shared {
    preferred: (u32, u32),
    events_read: u32,
    /// Present while the driver has the device activated.
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

/// Lets the host change the display size the guest is offered, from any thread.
#[derive(Clone)]
pub struct GpuHandle {
    shared: Arc<Mutex<Shared>>,
}

impl GpuHandle {
    /// Offers `width`×`height` (clamped to 640×480..MAX) as the new preferred mode and tells
    /// the driver through a display event and a configuration-change interrupt.
    pub fn set_display_size(&self, width: u32, height: u32) {
        let interrupt = {
            let mut s = lock(&self.shared);
            s.preferred = clamp_display(width, height);
            s.events_read |= EVENT_DISPLAY;
            s.interrupt.clone()
        };
        // Signalled unlocked: the transport's interrupt state is never taken under ours.
        if let Some(i) = interrupt {
            i.signal_config_change();
        }
    }

    /// The mode currently offered to the guest.
    pub fn display_size(&self) -> (u32, u32) {
        lock(&self.shared).preferred
    }
}

/// A guest memory range backing a resource.
#[derive(Debug, Clone, Copy)]
struct BackingEntry {
    addr: u64,
    len: u32,
    /// Offset of this entry within the backing as a whole.
    start: u64,
}

struct Resource {
    width: u32,
    height: u32,
    format: PixelFormat,
    /// The host copy, `width * 4` bytes per row.
    data: Vec<u8>,
    backing: Vec<BackingEntry>,
    backing_len: u64,
}

impl Resource {
    fn stride(&self) -> u32 {
        self.width * BYTES_PER_PIXEL
    }

    /// Whether `r` is non-empty and lies inside the resource.
    fn contains(&self, r: &Rect) -> bool {
        r.width > 0
            && r.height > 0
            && r.x.checked_add(r.width).is_some_and(|e| e <= self.width)
            && r.y.checked_add(r.height).is_some_and(|e| e <= self.height)
    }

    /// Copies backing bytes `offset..offset + dst.len()` into `dst`.
    fn read_backing(&self, memory: &GuestMemory, offset: u64, dst: &mut [u8]) -> bool {
        let end = match offset.checked_add(dst.len() as u64) {
            Some(e) if e <= self.backing_len => e,
            _ => return false,
        };
        let mut at = offset;
        // Entries are sorted by `start`; the first one that ends after `offset`.
        let mut i = self.backing.partition_point(|e| e.start + u64::from(e.len) <= offset);
        while at < end {
            let Some(e) = self.backing.get(i) else {
                return false;
            };
            let within = at - e.start;
            let n = (u64::from(e.len) - within).min(end - at) as usize;
            let done = (at - offset) as usize;
            // The range was checked at attach time, but memory access can still fail; the
            // copy is volatile underneath (the guest may write the pages concurrently).
            if memory.read_slice(&mut dst[done..done + n], GuestAddress(e.addr + within)).is_err() {
                return false;
            }
            at += n as u64;
            i += 1;
        }
        true
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Scanout {
    /// 0: disabled.
    resource_id: u32,
    /// The part of the resource shown.
    rect: Rect,
}

/// A parsed request: the header fields that the response echoes, and the body bytes.
struct Request {
    kind: u32,
    flags: u32,
    fence_id: u64,
    ctx_id: u32,
    ring_idx: u8,
    body: Vec<u8>,
}

impl Request {
    fn u32(&self, at: usize) -> u32 {
        self.body.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
    }

    fn u64(&self, at: usize) -> u64 {
        self.body.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
    }

    fn rect(&self, at: usize) -> Rect {
        Rect::new(self.u32(at), self.u32(at + 4), self.u32(at + 8), self.u32(at + 12))
    }

    /// A response header of `kind` echoing the fence.
    fn response(&self, kind: u32, len: usize) -> Vec<u8> {
        let mut r = vec![0u8; len.max(HDR_SIZE)];
        r[0..4].copy_from_slice(&kind.to_le_bytes());
        let flags = self.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX);
        r[4..8].copy_from_slice(&flags.to_le_bytes());
        if flags & FLAG_FENCE != 0 {
            r[8..16].copy_from_slice(&self.fence_id.to_le_bytes());
            r[16..20].copy_from_slice(&self.ctx_id.to_le_bytes());
            if flags & FLAG_INFO_RING_IDX != 0 {
                r[20] = self.ring_idx;
            }
        }
        r
    }
}

/// Body sizes (after the header) of each command's request.
fn body_size(kind: u32) -> Option<usize> {
    Some(match kind {
        CMD_GET_DISPLAY_INFO => 0,
        CMD_RESOURCE_CREATE_2D => 16,
        CMD_RESOURCE_UNREF | CMD_RESOURCE_DETACH_BACKING | CMD_GET_EDID => 8,
        CMD_SET_SCANOUT | CMD_RESOURCE_FLUSH => 24,
        CMD_TRANSFER_TO_HOST_2D => 32,
        CMD_RESOURCE_ATTACH_BACKING => 8,
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => 32,
        _ => return None,
    })
}

struct Active {
    memory: GuestMemory,
    queues: Vec<Queue>,
}

/// A virtio-gpu device with one scanout.
pub struct Gpu {
    sink: Arc<dyn ScanoutSink>,
    shared: Arc<Mutex<Shared>>,
    framebuffer_bar: Option<HostMemory>,
    active: Option<Active>,
    resources: BTreeMap<u32, Resource>,
    resource_bytes: u64,
    scanout: Scanout,
    /// The mode last given to the sink (None: disabled).
    sink_mode: Option<(u32, u32)>,
    /// Hot spot of the current cursor image, added to MOVE_CURSOR positions.
    cursor_hot: (u32, u32),
    cursor_visible: bool,
    /// The image and position last given to the sink, kept for snapshots.
    cursor: Option<(CursorImage, (u32, u32))>,
}

impl Gpu {
    /// A GPU offering `preferred` as its display size. `framebuffer_bar` (the boot
    /// framebuffer's memory) makes it the VGA-class owner of that memory, as its RAM BAR 0:
    /// the guest finds the framebuffer wherever that BAR points.
    pub fn new(
        sink: Arc<dyn ScanoutSink>,
        preferred: (u32, u32),
        framebuffer_bar: Option<HostMemory>,
    ) -> Gpu {
        Gpu {
            sink,
            shared: Arc::new(Mutex::new(Shared {
                preferred: clamp_display(preferred.0, preferred.1),
                events_read: 0,
                interrupt: None,
            })),
            framebuffer_bar,
            active: None,
            resources: BTreeMap::new(),
            resource_bytes: 0,
            scanout: Scanout::default(),
            sink_mode: None,
            cursor_hot: (0, 0),
            cursor_visible: false,
            cursor: None,
        }
    }

    pub fn handle(&self) -> GpuHandle {
        GpuHandle { shared: self.shared.clone() }
    }

    fn set_sink_mode(&mut self, mode: Option<(u32, u32)>) {
        if self.sink_mode != mode {
            self.sink_mode = mode;
            self.sink.set_mode(SourceId::Gpu(0), mode);
        }
    }

    /// Handles one chain; returns the bytes written into it.
    fn handle_chain(&mut self, memory: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let buffers = match map_chain(memory, chain) {
            Ok(b) => b,
            Err(e) => {
                warn!("virtio-gpu: dropping request: {e}");
                return 0;
            }
        };
        let mut head = [0u8; HDR_SIZE];
        let got = copy_from_slices(&buffers.readable, &mut head);
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let mut req = Request {
            kind: word(0),
            flags: word(4),
            fence_id: u64::from(word(8)) | u64::from(word(12)) << 32,
            ctx_id: word(16),
            ring_idx: head[20],
            body: Vec::new(),
        };
        let response = if got < HDR_SIZE || buffers.fault.is_some() {
            req.flags = 0;
            req.response(RESP_ERR_UNSPEC, HDR_SIZE)
        } else {
            match body_size(req.kind) {
                None => {
                    debug!("virtio-gpu: unsupported command {:#x}", req.kind);
                    req.response(RESP_ERR_UNSPEC, HDR_SIZE)
                }
                Some(size) => {
                    let mut all = vec![0u8; HDR_SIZE + size];
                    if copy_from_slices(&buffers.readable, &mut all) < all.len() {
                        req.response(RESP_ERR_UNSPEC, HDR_SIZE)
                    } else {
                        req.body = all.split_off(HDR_SIZE);
                        self.command(memory, &req, &buffers.readable)
                    }
                }
            }
        };
        if buffers.writable_len() < response.len() {
            warn!(
                "virtio-gpu: response buffer too small ({} < {} bytes)",
                buffers.writable_len(),
                response.len()
            );
            return 0;
        }
        copy_to_slices(&buffers.writable, &response) as u32
    }

    fn command(
        &mut self,
        memory: &GuestMemory,
        req: &Request,
        readable: &[vm_memory::VolatileSlice<'_>],
    ) -> Vec<u8> {
        let result = match req.kind {
            CMD_GET_DISPLAY_INFO => return self.display_info(req),
            CMD_GET_EDID => return self.get_edid(req),
            CMD_RESOURCE_CREATE_2D => self.create_2d(req),
            CMD_RESOURCE_UNREF => self.unref(req),
            CMD_SET_SCANOUT => self.set_scanout(req),
            CMD_RESOURCE_FLUSH => self.flush(req),
            CMD_TRANSFER_TO_HOST_2D => self.transfer(memory, req),
            CMD_RESOURCE_ATTACH_BACKING => self.attach_backing(memory, req, readable),
            CMD_RESOURCE_DETACH_BACKING => self.detach_backing(req),
            CMD_UPDATE_CURSOR => self.update_cursor(req),
            CMD_MOVE_CURSOR => self.move_cursor(req),
            _ => Err(RESP_ERR_UNSPEC),
        };
        let kind = match result {
            Ok(()) => RESP_OK_NODATA,
            Err(e) => {
                debug!("virtio-gpu: command {:#x} failed with {e:#x}", req.kind);
                e
            }
        };
        req.response(kind, HDR_SIZE)
    }

    fn display_info(&self, req: &Request) -> Vec<u8> {
        let (w, h) = lock(&self.shared).preferred;
        let mut r = req.response(RESP_OK_DISPLAY_INFO, DISPLAY_INFO_SIZE);
        let mode = &mut r[HDR_SIZE..HDR_SIZE + 24];
        mode[8..12].copy_from_slice(&w.to_le_bytes());
        mode[12..16].copy_from_slice(&h.to_le_bytes());
        mode[16..20].copy_from_slice(&1u32.to_le_bytes()); // enabled
        r
    }

    fn get_edid(&self, req: &Request) -> Vec<u8> {
        if req.u32(0) != 0 {
            return req.response(RESP_ERR_INVALID_SCANOUT_ID, HDR_SIZE);
        }
        let (w, h) = lock(&self.shared).preferred;
        let block = edid(w, h);
        let mut r = req.response(RESP_OK_EDID, EDID_RESP_SIZE);
        r[HDR_SIZE..HDR_SIZE + 4].copy_from_slice(&(block.len() as u32).to_le_bytes());
        r[HDR_SIZE + 8..HDR_SIZE + 8 + block.len()].copy_from_slice(&block);
        r
    }

    fn create_2d(&mut self, req: &Request) -> Result<(), u32> {
        let (id, format, width, height) = (req.u32(0), req.u32(4), req.u32(8), req.u32(12));
        if id == 0 || self.resources.contains_key(&id) {
            return Err(RESP_ERR_INVALID_RESOURCE_ID);
        }
        let format = pixel_format(format).ok_or(RESP_ERR_INVALID_PARAMETER)?;
        if width == 0 || height == 0 || width > MAX_RESOURCE_WIDTH || height > MAX_RESOURCE_HEIGHT {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        // Bounded by the dimension caps above: no overflow.
        let bytes = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        if self.resource_bytes + bytes > MAX_RESOURCE_BYTES {
            return Err(RESP_ERR_OUT_OF_MEMORY);
        }
        // Zeroed pages straight from the allocator: untouched rows cost no host memory.
        let data = vec![0u8; bytes as usize];
        self.resource_bytes += bytes;
        self.resources.insert(
            id,
            Resource { width, height, format, data, backing: Vec::new(), backing_len: 0 },
        );
        Ok(())
    }

    fn unref(&mut self, req: &Request) -> Result<(), u32> {
        let id = req.u32(0);
        let res = self.resources.remove(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        self.resource_bytes -= res.data.len() as u64;
        if self.scanout.resource_id == id {
            self.scanout = Scanout::default();
            self.set_sink_mode(None);
        }
        Ok(())
    }

    fn set_scanout(&mut self, req: &Request) -> Result<(), u32> {
        let (rect, scanout_id, id) = (req.rect(0), req.u32(16), req.u32(20));
        if scanout_id != 0 {
            return Err(RESP_ERR_INVALID_SCANOUT_ID);
        }
        if id == 0 {
            self.scanout = Scanout::default();
            self.set_sink_mode(None);
            return Ok(());
        }
        let res = self.resources.get(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if !res.contains(&rect) {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        self.scanout = Scanout { resource_id: id, rect };
        self.set_sink_mode(Some((rect.width, rect.height)));
        // A new buffer is shown: the whole scanout changed.
        self.show(Rect::new(0, 0, rect.width, rect.height));
        Ok(())
    }

    /// Sends `rect` (scanout coordinates, inside the scanout) of the scanout to the sink.
    fn show(&self, rect: Rect) {
        let s = self.scanout;
        let Some(res) = self.resources.get(&s.resource_id) else {
            return;
        };
        let stride = res.stride();
        let start =
            s.rect.y as usize * stride as usize + s.rect.x as usize * BYTES_PER_PIXEL as usize;
        let Some(data) = res.data.get(start..) else {
            return;
        };
        let image =
            Image { data, width: s.rect.width, height: s.rect.height, stride, format: res.format };
        self.sink.update(SourceId::Gpu(0), &image, rect);
    }

    fn flush(&mut self, req: &Request) -> Result<(), u32> {
        let (rect, id) = (req.rect(0), req.u32(16));
        let res = self.resources.get(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if !res.contains(&rect) {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        if self.scanout.resource_id != id {
            return Ok(());
        }
        // Intersect with the scanout's rectangle, then move to scanout coordinates.
        let s = self.scanout.rect;
        let x0 = rect.x.max(s.x);
        let y0 = rect.y.max(s.y);
        let x1 = (rect.x + rect.width).min(s.x + s.width);
        let y1 = (rect.y + rect.height).min(s.y + s.height);
        if x0 < x1 && y0 < y1 {
            self.show(Rect::new(x0 - s.x, y0 - s.y, x1 - x0, y1 - y0));
        }
        Ok(())
    }

    fn transfer(&mut self, memory: &GuestMemory, req: &Request) -> Result<(), u32> {
        let (rect, offset, id) = (req.rect(0), req.u64(16), req.u32(24));
        let res = self.resources.get_mut(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if !res.contains(&rect) {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        if res.backing.is_empty() {
            return Err(RESP_ERR_UNSPEC);
        }
        let stride = u64::from(res.stride());
        let row_bytes = u64::from(rect.width) * u64::from(BYTES_PER_PIXEL);
        // The last row's end must lie inside the backing.
        let last_end = stride
            .checked_mul(u64::from(rect.height - 1))
            .and_then(|v| v.checked_add(offset))
            .and_then(|v| v.checked_add(row_bytes));
        if last_end.is_none_or(|e| e > res.backing_len) {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        let mut data = std::mem::take(&mut res.data);
        let mut ok = true;
        for row in 0..u64::from(rect.height) {
            let src = offset + stride * row;
            let dst = ((u64::from(rect.y) + row) * stride + u64::from(rect.x) * 4) as usize;
            // Inside the resource: `contains` checked the rectangle.
            let Some(line) = data.get_mut(dst..dst + row_bytes as usize) else {
                ok = false;
                break;
            };
            if !res.read_backing(memory, src, line) {
                ok = false;
                break;
            }
        }
        res.data = data;
        if ok {
            Ok(())
        } else {
            Err(RESP_ERR_UNSPEC)
        }
    }

    fn attach_backing(
        &mut self,
        memory: &GuestMemory,
        req: &Request,
        readable: &[vm_memory::VolatileSlice<'_>],
    ) -> Result<(), u32> {
        let (id, count) = (req.u32(0), req.u32(4));
        let res = self.resources.get_mut(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if !res.backing.is_empty() {
            return Err(RESP_ERR_UNSPEC);
        }
        if count == 0 || count > MAX_BACKING_ENTRIES {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        let first = HDR_SIZE + 8;
        let mut raw = vec![0u8; first + count as usize * MEM_ENTRY_SIZE];
        if copy_from_slices(readable, &mut raw) < raw.len() {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        let mut backing = Vec::with_capacity(count as usize);
        let mut total = 0u64;
        for entry in raw[first..].chunks_exact(MEM_ENTRY_SIZE) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&entry[0..8]);
            let addr = u64::from_le_bytes(a);
            let len = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
            // Every byte must be guest RAM, without wrapping past the top of the address space.
            let valid = len > 0
                && addr.checked_add(u64::from(len)).is_some()
                && memory.check_range(GuestAddress(addr), len as usize);
            if !valid {
                return Err(RESP_ERR_INVALID_PARAMETER);
            }
            backing.push(BackingEntry { addr, len, start: total });
            total += u64::from(len);
        }
        res.backing = backing;
        res.backing_len = total;
        Ok(())
    }

    fn detach_backing(&mut self, req: &Request) -> Result<(), u32> {
        let res = self.resources.get_mut(&req.u32(0)).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if res.backing.is_empty() {
            return Err(RESP_ERR_UNSPEC);
        }
        res.backing = Vec::new();
        res.backing_len = 0;
        Ok(())
    }

    /// The cursor's hot-spot position from a cursor_pos (the image's top-left corner).
    fn cursor_position(&self, req: &Request) -> (u32, u32) {
        (req.u32(4).saturating_add(self.cursor_hot.0), req.u32(8).saturating_add(self.cursor_hot.1))
    }

    fn update_cursor(&mut self, req: &Request) -> Result<(), u32> {
        let (id, hot_x, hot_y) = (req.u32(16), req.u32(20), req.u32(24));
        if req.u32(0) != 0 {
            return Err(RESP_ERR_INVALID_SCANOUT_ID);
        }
        if id == 0 {
            self.cursor_visible = false;
            self.cursor = None;
            self.sink.set_cursor(None);
            return Ok(());
        }
        let res = self.resources.get(&id).ok_or(RESP_ERR_INVALID_RESOURCE_ID)?;
        if res.width > MAX_CURSOR_SIZE || res.height > MAX_CURSOR_SIZE {
            return Err(RESP_ERR_INVALID_PARAMETER);
        }
        let cursor = CursorImage {
            width: res.width,
            height: res.height,
            hot_x: hot_x.min(res.width - 1),
            hot_y: hot_y.min(res.height - 1),
            format: res.format,
            data: res.data.clone(),
        };
        self.cursor_hot = (cursor.hot_x, cursor.hot_y);
        self.cursor_visible = true;
        let (x, y) = self.cursor_position(req);
        self.cursor = Some((cursor.clone(), (x, y)));
        self.sink.set_cursor(Some(cursor));
        self.sink.move_cursor(x, y);
        Ok(())
    }

    fn move_cursor(&mut self, req: &Request) -> Result<(), u32> {
        if req.u32(0) != 0 {
            return Err(RESP_ERR_INVALID_SCANOUT_ID);
        }
        let (x, y) = self.cursor_position(req);
        if let Some((_, pos)) = self.cursor.as_mut() {
            *pos = (x, y);
        }
        self.sink.move_cursor(x, y);
        Ok(())
    }

    /// Drops every resource and disables the scanout and cursor.
    fn clear(&mut self) {
        self.resources.clear();
        self.resource_bytes = 0;
        self.scanout = Scanout::default();
        self.cursor_hot = (0, 0);
        self.set_sink_mode(None);
        self.cursor = None;
        if self.cursor_visible {
            self.cursor_visible = false;
            self.sink.set_cursor(None);
        }
    }

    fn save(&self) -> GpuState {
        let shared = lock(&self.shared);
        let s = self.scanout;
        GpuState {
            resources: self
                .resources
                .iter()
                .map(|(&id, r)| GpuResourceState {
                    id,
                    format: format_code(r.format),
                    width: r.width,
                    height: r.height,
                    backing: r.backing.iter().map(|e| (e.addr, e.len)).collect(),
                    data: r.data.clone(),
                })
                .collect(),
            scanout_resource: s.resource_id,
            scanout_rect: [s.rect.x, s.rect.y, s.rect.width, s.rect.height],
            cursor: self.cursor.as_ref().map(|(c, (x, y))| GpuCursorState {
                width: c.width,
                height: c.height,
                hot_x: c.hot_x,
                hot_y: c.hot_y,
                format: format_code(c.format),
                data: c.data.clone(),
                x: *x,
                y: *y,
            }),
            cursor_hot: self.cursor_hot,
            preferred: shared.preferred,
            events_read: shared.events_read,
            active: self.active.is_some(),
        }
    }

    /// Rebuilds the resources from saved state, checked like the commands that made them.
    fn check_resources(
        saved: &GpuState,
        memory: Option<&GuestMemory>,
    ) -> Result<(BTreeMap<u32, Resource>, u64), GpuError> {
        let mut resources = BTreeMap::new();
        let mut total = 0u64;
        for r in &saved.resources {
            let format = pixel_format(r.format).ok_or(GpuError::ResourceFormat(r.id))?;
            if r.id == 0 || resources.contains_key(&r.id) {
                return Err(GpuError::ResourceId(r.id));
            }
            if r.width == 0
                || r.height == 0
                || r.width > MAX_RESOURCE_WIDTH
                || r.height > MAX_RESOURCE_HEIGHT
            {
                return Err(GpuError::ResourceSize(r.id));
            }
            let bytes = u64::from(r.width) * u64::from(r.height) * u64::from(BYTES_PER_PIXEL);
            total += bytes;
            if total > MAX_RESOURCE_BYTES || r.data.len() as u64 != bytes {
                return Err(GpuError::ResourcePixels(r.id));
            }
            if r.backing.len() > MAX_BACKING_ENTRIES as usize {
                return Err(GpuError::BackingEntries(r.id));
            }
            let mut backing = Vec::with_capacity(r.backing.len());
            let mut start = 0u64;
            for &(addr, len) in &r.backing {
                let in_memory =
                    memory.is_none_or(|m| m.check_range(GuestAddress(addr), len as usize));
                if len == 0 || addr.checked_add(u64::from(len)).is_none() || !in_memory {
                    return Err(GpuError::BackingOutsideMemory(r.id));
                }
                backing.push(BackingEntry { addr, len, start });
                start += u64::from(len);
            }
            resources.insert(
                r.id,
                Resource {
                    width: r.width,
                    height: r.height,
                    format,
                    data: r.data.clone(),
                    backing,
                    backing_len: start,
                },
            );
        }
        Ok((resources, total))
    }

    fn restore(&mut self, saved: GpuState, active: Option<RestoredQueues>) -> Result<(), GpuError> {
        if saved.active != active.is_some() {
            return Err(GpuError::ActivityMismatch);
        }
        let (resources, total) = Self::check_resources(&saved, active.as_ref().map(|a| &a.memory))?;
        let [x, y, w, h] = saved.scanout_rect;
        let rect = Rect::new(x, y, w, h);
        if saved.scanout_resource != 0
            && !resources.get(&saved.scanout_resource).is_some_and(|r| r.contains(&rect))
        {
            return Err(GpuError::Scanout);
        }
        let cursor = match &saved.cursor {
            Some(c) => {
                let format = pixel_format(c.format).ok_or(GpuError::CursorFormat)?;
                let fits = (1..=MAX_CURSOR_SIZE).contains(&c.width)
                    && (1..=MAX_CURSOR_SIZE).contains(&c.height)
                    && c.hot_x < c.width
                    && c.hot_y < c.height
                    && c.data.len() as u64 == u64::from(c.width * c.height * BYTES_PER_PIXEL);
                if !fits {
                    return Err(GpuError::CursorSize);
                }
                let image = CursorImage {
                    width: c.width,
                    height: c.height,
                    hot_x: c.hot_x,
                    hot_y: c.hot_y,
                    format,
                    data: c.data.clone(),
                };
                Some((image, (c.x, c.y)))
            }
            None => None,
        };
        if let Some(a) = &active {
            if a.queues.len() != QUEUE_SIZES.len() {
                return Err(GpuError::QueueCount(a.queues.len()));
            }
        }
        // Everything checked: apply, then show what was shown.
        {
            let mut shared = lock(&self.shared);
            shared.preferred = clamp_display(saved.preferred.0, saved.preferred.1);
            shared.events_read = saved.events_read;
            shared.interrupt = active.as_ref().map(|a| a.interrupt.clone());
        }
        self.active = active.map(|a| Active { memory: a.memory, queues: a.queues });
        self.resources = resources;
        self.resource_bytes = total;
        self.cursor_hot = saved.cursor_hot;
        if saved.scanout_resource == 0 {
            self.scanout = Scanout::default();
            self.set_sink_mode(None);
        } else {
            self.scanout = Scanout { resource_id: saved.scanout_resource, rect };
            // The sink of a fresh machine starts without a mode: set it even if it matches.
            self.sink_mode = Some((rect.width, rect.height));
            self.sink.set_mode(SourceId::Gpu(0), self.sink_mode);
            self.show(Rect::new(0, 0, rect.width, rect.height));
        }
        match cursor {
            Some((image, (x, y))) => {
                self.cursor_visible = true;
                self.cursor = Some((image.clone(), (x, y)));
                self.sink.set_cursor(Some(image));
                self.sink.move_cursor(x, y);
            }
            None => {
                self.cursor = None;
                if self.cursor_visible {
                    self.cursor_visible = false;
                    self.sink.set_cursor(None);
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Gpu {
    fn device_type(&self) -> u32 {
        TYPE_GPU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_GPU_F_EDID
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let events_read = lock(&self.shared).events_read;
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&events_read.to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes()); // num_scanouts
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // events_clear: write-to-clear bits of events_read.
        if offset == 4 && data.len() == 4 {
            let clear = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            lock(&self.shared).events_read &= !clear;
        }
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(VirtioError::QueueCount { expected: QUEUE_SIZES.len(), got: queues.len() });
        }
        lock(&self.shared).interrupt = Some(interrupt);
        self.active = Some(Active { memory, queues });
        Ok(())
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError> {
        if queue_index != CONTROL_QUEUE && queue_index != CURSOR_QUEUE {
            return Err(VirtioError::NoSuchQueue(queue_index));
        }
        let Some(mut active) = self.active.take() else {
            return Ok(false);
        };
        let memory = active.memory.clone();
        let result = match active.queues.get_mut(queue_index) {
            Some(queue) => drain_queue(queue, &memory, |chain| self.handle_chain(&memory, chain))
                .map_err(|source| VirtioError::Queue { index: queue_index, source }),
            None => Err(VirtioError::NoSuchQueue(queue_index)),
        };
        self.active = Some(active);
        result
    }

    fn reset(&mut self) {
        self.active = None;
        lock(&self.shared).interrupt = None;
        self.clear();
    }

    fn pci_class_code(&self) -> Option<u32> {
        self.framebuffer_bar.as_ref().map(|_| CLASS_DISPLAY_VGA)
    }

    fn ram_bar(&self) -> Option<HostMemory> {
        self.framebuffer_bar.clone()
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode("virtio-gpu", &self.save())
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    fn restore_state(
        &mut self,
        saved: &[u8],
        active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        let saved: GpuState = state::decode("virtio-gpu", saved)?;
        self.restore(saved, active).map_err(|e| StateError::invalid("virtio-gpu", e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A [`ScanoutSink`] that records what it is told and keeps the pixels it was sent.
    #![allow(clippy::unwrap_used)] // Test scaffolding fails loudly on purpose.

    use std::collections::HashMap;

    use super::*;

    type ModeLog = Mutex<Vec<(SourceId, Option<(u32, u32)>)>>;

    #[derive(Default)]
    pub struct RecordingScreen {
        pub modes: ModeLog,
        updates: Mutex<Vec<(SourceId, Rect)>>,
        /// Pixels (as little-endian u32) of the last source updated, by position.
        pixels: Mutex<HashMap<(u32, u32), u32>>,
        pub cursors: Mutex<Vec<Option<CursorImage>>>,
        pub moves: Mutex<Vec<(u32, u32)>>,
    }

    impl RecordingScreen {
        pub fn updates(&self) -> Vec<(SourceId, Rect)> {
            self.updates.lock().unwrap().clone()
        }

        pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
            self.pixels.lock().unwrap().get(&(x, y)).copied()
        }
    }

    impl ScanoutSink for RecordingScreen {
        fn set_mode(&self, source: SourceId, mode: Option<(u32, u32)>) {
            self.modes.lock().unwrap().push((source, mode));
        }

        fn update(&self, source: SourceId, image: &Image<'_>, rect: Rect) {
            assert!(rect.x + rect.width <= image.width && rect.y + rect.height <= image.height);
            let last =
                (image.height - 1) as usize * image.stride as usize + image.width as usize * 4;
            assert!(image.data.len() >= last, "image data shorter than its rows");
            let mut pixels = self.pixels.lock().unwrap();
            for y in rect.y..rect.y + rect.height {
                for x in rect.x..rect.x + rect.width {
                    let at = y as usize * image.stride as usize + x as usize * 4;
                    let p = u32::from_le_bytes(image.data[at..at + 4].try_into().unwrap());
                    pixels.insert((x, y), p);
                }
            }
            self.updates.lock().unwrap().push((source, rect));
        }

        fn set_cursor(&self, cursor: Option<CursorImage>) {
            self.cursors.lock().unwrap().push(cursor);
        }

        fn move_cursor(&self, x: u32, y: u32) {
            self.moves.lock().unwrap().push((x, y));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use vm_memory::Bytes;

    use super::testing::RecordingScreen;
    use super::*;
    use crate::pci::PciDevice;
    use crate::virtio::gpu::boot_fb::{self, BootFramebuffer};
    use crate::virtio::pci_transport::testing::{TestDriver, CONFIG_MSI_DATA, MSI_ADDR};
    use crate::virtio::pci_transport::DEVICE_CFG_OFFSET;
    use crate::virtio::queue::testing::{TestQueue, DESC_F_NEXT, DESC_F_WRITE};

    const REQ: u64 = 0x20_0000;
    const ENTRIES: u64 = 0x21_0000;
    const RESP: u64 = 0x28_0000;
    const BACKING_A: u64 = 0x30_0000;
    const BACKING_B: u64 = 0x38_0000;

    struct Harness {
        d: TestDriver,
        screen: Arc<RecordingScreen>,
        handle: GpuHandle,
        cursorq: TestQueue,
    }

    fn harness() -> Harness {
        let screen = Arc::new(RecordingScreen::default());
        let gpu = Gpu::new(screen.clone(), (1024, 768), None);
        let handle = gpu.handle();
        let mut d = TestDriver::new(Box::new(gpu));
        let cursorq = TestQueue::new(16, 0x18_0000);
        d.bring_up_queues(&[&cursorq]);
        Harness { d, screen, handle, cursorq }
    }

    fn hdr(kind: u32) -> Vec<u8> {
        let mut v = kind.to_le_bytes().to_vec();
        v.resize(HDR_SIZE, 0);
        v
    }

    fn req(kind: u32, words: &[u32]) -> Vec<u8> {
        let mut v = hdr(kind);
        v.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        v
    }

    fn transfer_req(rect: [u32; 4], offset: u64, id: u32) -> Vec<u8> {
        let mut v = req(CMD_TRANSFER_TO_HOST_2D, &rect);
        v.extend(offset.to_le_bytes());
        v.extend([id, 0].iter().flat_map(|w| w.to_le_bytes()));
        v
    }

    impl Harness {
        /// Sends `request` (plus `extra` in its own readable descriptor) on `queue` with a
        /// `resp_len` response buffer; returns the bytes the device wrote.
        fn send_on(
            &mut self,
            queue: usize,
            request: &[u8],
            extra: &[u8],
            resp_len: u32,
        ) -> Vec<u8> {
            let mem = self.d.mem.clone();
            mem.write_slice(request, GuestAddress(REQ)).unwrap();
            mem.write_slice(extra, GuestAddress(ENTRIES)).unwrap();
            let tq = if queue == 0 { &mut self.d.tq } else { &mut self.cursorq };
            let mut descs = vec![(REQ, request.len() as u32, 0)];
            if !extra.is_empty() {
                descs.push((ENTRIES, extra.len() as u32, 0));
            }
            if resp_len > 0 {
                descs.push((RESP, resp_len, DESC_F_WRITE));
            }
            let n = descs.len();
            for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
                let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
                tq.set_desc(&mem, i as u16, addr, len, flags | next, i as u16 + 1);
            }
            let before = tq.used_idx(&mem);
            tq.push(&mem, 0);
            self.d.notify(queue as u64);
            let tq = if queue == 0 { &self.d.tq } else { &self.cursorq };
            assert_eq!(tq.used_idx(&mem), before.wrapping_add(1), "request not completed");
            let (_, len) = tq.used_elem(&mem, before);
            let mut out = vec![0u8; len as usize];
            mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
            out
        }

        fn send(&mut self, request: &[u8]) -> u32 {
            let r = self.send_on(0, request, &[], 64);
            u32::from_le_bytes(r[0..4].try_into().unwrap())
        }

        fn create(&mut self, id: u32, w: u32, h: u32) -> u32 {
            self.send(&req(CMD_RESOURCE_CREATE_2D, &[id, 2, w, h]))
        }

        fn attach(&mut self, id: u32, entries: &[(u64, u32)]) -> u32 {
            let raw: Vec<u8> = entries
                .iter()
                .flat_map(|(a, l)| {
                    let mut e = a.to_le_bytes().to_vec();
                    e.extend(l.to_le_bytes());
                    e.extend(0u32.to_le_bytes());
                    e
                })
                .collect();
            let r = self.send_on(
                0,
                &req(CMD_RESOURCE_ATTACH_BACKING, &[id, entries.len() as u32]),
                &raw,
                64,
            );
            u32::from_le_bytes(r[0..4].try_into().unwrap())
        }

        fn config(&mut self, offset: u64) -> u32 {
            self.d.read(DEVICE_CFG_OFFSET + offset, 4) as u32
        }
    }

    /// Fills a 64×32 resource's backing (two 4 KiB entries) with pixel (x, y) = y << 16 | x.
    fn fill_backing(h: &Harness) {
        for y in 0..32u32 {
            for x in 0..64u32 {
                let off = u64::from(y * 256 + x * 4);
                let addr = if off < 4096 { BACKING_A + off } else { BACKING_B + off - 4096 };
                h.d.mem.write_obj(y << 16 | x, GuestAddress(addr)).unwrap();
            }
        }
    }

    /// A 64×32 resource 1 with backing, shown on the scanout and transferred in full.
    fn shown_resource(h: &mut Harness, scanout: [u32; 4]) {
        assert_eq!(h.create(1, 64, 32), RESP_OK_NODATA);
        assert_eq!(h.attach(1, &[(BACKING_A, 4096), (BACKING_B, 4096)]), RESP_OK_NODATA);
        fill_backing(h);
        let [x, y, w, hh] = scanout;
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[x, y, w, hh, 0, 1])), RESP_OK_NODATA);
        assert_eq!(h.send(&transfer_req([0, 0, 64, 32], 0, 1)), RESP_OK_NODATA);
    }

    #[test]
    fn display_info_reports_the_preferred_mode() {
        let mut h = harness();
        let r = h.send_on(0, &hdr(CMD_GET_DISPLAY_INFO), &[], 512);
        assert_eq!(r.len(), DISPLAY_INFO_SIZE);
        let word = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
        assert_eq!(word(0), RESP_OK_DISPLAY_INFO);
        assert_eq!((word(24 + 8), word(24 + 12), word(24 + 16)), (1024, 768, 1));
        assert_eq!(word(48 + 16), 0, "only one scanout is enabled");
        assert_eq!((h.config(8), h.config(12)), (1, 0), "one scanout, no capsets");
    }

    #[test]
    fn full_sequence_flushes_the_transferred_pixels_to_the_sink() {
        let mut h = harness();
        shown_resource(&mut h, [0, 0, 64, 32]);
        assert_eq!(
            h.screen.modes.lock().unwrap().as_slice(),
            &[(SourceId::Gpu(0), Some((64, 32)))]
        );
        assert_eq!(h.send(&req(CMD_RESOURCE_FLUSH, &[8, 4, 16, 8, 1, 0])), RESP_OK_NODATA);
        let last = *h.screen.updates().last().unwrap();
        assert_eq!(last, (SourceId::Gpu(0), Rect::new(8, 4, 16, 8)));
        assert_eq!(h.screen.pixel(10, 5), Some(5 << 16 | 10));
        assert_eq!(h.screen.pixel(23, 11), Some(11 << 16 | 23), "second backing entry");
    }

    #[test]
    fn flush_is_clipped_and_translated_to_the_scanout() {
        let mut h = harness();
        shown_resource(&mut h, [16, 8, 32, 16]);
        assert_eq!(h.send(&req(CMD_RESOURCE_FLUSH, &[0, 0, 20, 10, 1, 0])), RESP_OK_NODATA);
        let last = *h.screen.updates().last().unwrap();
        assert_eq!(last, (SourceId::Gpu(0), Rect::new(0, 0, 4, 2)));
        assert_eq!(h.screen.pixel(0, 0), Some(8 << 16 | 16));
        let n = h.screen.updates().len();
        assert_eq!(h.send(&req(CMD_RESOURCE_FLUSH, &[0, 0, 8, 8, 1, 0])), RESP_OK_NODATA);
        assert_eq!(h.screen.updates().len(), n, "outside the scanout: nothing to show");
    }

    #[test]
    fn partial_transfer_copies_only_its_rectangle() {
        let mut h = harness();
        assert_eq!(h.create(1, 64, 32), RESP_OK_NODATA);
        assert_eq!(h.attach(1, &[(BACKING_A, 4096), (BACKING_B, 4096)]), RESP_OK_NODATA);
        fill_backing(&h);
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[0, 0, 64, 32, 0, 1])), RESP_OK_NODATA);
        let offset = 2 * 256 + 4 * 4;
        assert_eq!(h.send(&transfer_req([4, 2, 8, 3], offset, 1)), RESP_OK_NODATA);
        assert_eq!(h.send(&req(CMD_RESOURCE_FLUSH, &[0, 0, 64, 32, 1, 0])), RESP_OK_NODATA);
        assert_eq!(h.screen.pixel(4, 2), Some(2 << 16 | 4));
        assert_eq!(h.screen.pixel(11, 4), Some(4 << 16 | 11));
        assert_eq!(h.screen.pixel(12, 4), Some(0));
        assert_eq!(h.screen.pixel(4, 5), Some(0));
    }

    #[test]
    fn fence_is_echoed_in_the_response() {
        let mut h = harness();
        let mut r = req(CMD_RESOURCE_CREATE_2D, &[1, 2, 8, 8]);
        r[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
        r[8..16].copy_from_slice(&0x1234_5678_9abc_u64.to_le_bytes());
        r[16..20].copy_from_slice(&7u32.to_le_bytes());
        let resp = h.send_on(0, &r, &[], 24);
        assert_eq!(resp[0..4], RESP_OK_NODATA.to_le_bytes());
        assert_eq!(resp[4..8], FLAG_FENCE.to_le_bytes());
        assert_eq!(resp[8..16], 0x1234_5678_9abc_u64.to_le_bytes());
        assert_eq!(resp[16..20], 7u32.to_le_bytes());
    }

    #[test]
    fn bad_resource_sizes_formats_and_ids_are_refused() {
        let mut h = harness();
        assert_eq!(h.create(1, 0, 10), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(h.create(1, 100_000, 10), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(h.create(1, 10, u32::MAX), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(
            h.send(&req(CMD_RESOURCE_CREATE_2D, &[1, 99, 8, 8])),
            RESP_ERR_INVALID_PARAMETER
        );
        assert_eq!(h.create(0, 8, 8), RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(h.create(1, 8, 8), RESP_OK_NODATA);
        assert_eq!(h.create(1, 8, 8), RESP_ERR_INVALID_RESOURCE_ID);
        for cmd in [CMD_RESOURCE_UNREF, CMD_RESOURCE_DETACH_BACKING] {
            assert_eq!(h.send(&req(cmd, &[42, 0])), RESP_ERR_INVALID_RESOURCE_ID);
        }
        assert_eq!(
            h.send(&req(CMD_SET_SCANOUT, &[0, 0, 8, 8, 0, 42])),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[0, 0, 8, 8, 3, 1])), RESP_ERR_INVALID_SCANOUT_ID);
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[4, 0, 8, 8, 0, 1])), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(
            h.send(&req(CMD_RESOURCE_FLUSH, &[0, 0, 8, 8, 42, 0])),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        assert_eq!(h.send(&transfer_req([0, 0, 8, 8], 0, 42)), RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(h.send(&transfer_req([0, 0, 8, 8], 0, 1)), RESP_ERR_UNSPEC, "no backing");
    }

    #[test]
    fn resource_memory_is_capped() {
        let mut h = harness();
        // Each is ~127 MiB: two fit in 256 MiB, a third does not.
        assert_eq!(h.create(1, MAX_RESOURCE_WIDTH, MAX_RESOURCE_HEIGHT), RESP_OK_NODATA);
        assert_eq!(h.create(2, MAX_RESOURCE_WIDTH, MAX_RESOURCE_HEIGHT), RESP_OK_NODATA);
        assert_eq!(h.create(3, MAX_RESOURCE_WIDTH, MAX_RESOURCE_HEIGHT), RESP_ERR_OUT_OF_MEMORY);
        assert_eq!(h.send(&req(CMD_RESOURCE_UNREF, &[1, 0])), RESP_OK_NODATA);
        assert_eq!(h.create(3, MAX_RESOURCE_WIDTH, MAX_RESOURCE_HEIGHT), RESP_OK_NODATA);
    }

    #[test]
    fn backing_outside_guest_memory_or_malformed_is_refused() {
        let mut h = harness();
        assert_eq!(h.create(1, 64, 32), RESP_OK_NODATA);
        assert_eq!(h.attach(1, &[(0xffff_0000_0000, 4096)]), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(h.attach(1, &[(u64::MAX - 100, 4096)]), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(
            h.attach(1, &[(0x3f_f000, 0x2000)]),
            RESP_ERR_INVALID_PARAMETER,
            "crosses the end"
        );
        assert_eq!(h.attach(1, &[(BACKING_A, 0)]), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(h.attach(1, &[]), RESP_ERR_INVALID_PARAMETER);
        let r = h.send_on(0, &req(CMD_RESOURCE_ATTACH_BACKING, &[1, 4]), &[0; 16], 64);
        assert_eq!(r[0..4], RESP_ERR_INVALID_PARAMETER.to_le_bytes(), "fewer entries than said");
        let r = h.send_on(0, &req(CMD_RESOURCE_ATTACH_BACKING, &[1, u32::MAX]), &[0; 16], 64);
        assert_eq!(r[0..4], RESP_ERR_INVALID_PARAMETER.to_le_bytes());
        assert_eq!(h.attach(42, &[(BACKING_A, 4096)]), RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(h.attach(1, &[(BACKING_A, 4096)]), RESP_OK_NODATA);
        assert_eq!(h.attach(1, &[(BACKING_A, 4096)]), RESP_ERR_UNSPEC, "already attached");
    }

    #[test]
    fn transfers_outside_the_resource_or_backing_are_refused() {
        let mut h = harness();
        assert_eq!(h.create(1, 64, 32), RESP_OK_NODATA);
        assert_eq!(h.attach(1, &[(BACKING_A, 4096)]), RESP_OK_NODATA);
        let bad = [
            ([0, 0, 64, 32], 0), // needs 8 KiB, backing has 4
            ([0, 0, 8, 1], 4095),
            ([0, 0, 8, 1], u64::MAX - 3),
            ([60, 0, 8, 1], 0),
            ([u32::MAX, 0, 2, 1], 0),
            ([0, u32::MAX, 1, 2], 0),
            ([0, 0, 0, 1], 0),
        ];
        for (rect, offset) in bad {
            assert_eq!(
                h.send(&transfer_req(rect, offset, 1)),
                RESP_ERR_INVALID_PARAMETER,
                "{rect:?}"
            );
        }
        assert_eq!(h.send(&transfer_req([0, 0, 64, 16], 0, 1)), RESP_OK_NODATA);
        assert_eq!(h.send(&req(CMD_RESOURCE_DETACH_BACKING, &[1, 0])), RESP_OK_NODATA);
        assert_eq!(h.send(&transfer_req([0, 0, 64, 16], 0, 1)), RESP_ERR_UNSPEC);
    }

    #[test]
    fn short_unknown_and_faulty_requests_get_errors() {
        let mut h = harness();
        assert_eq!(h.send(&hdr(CMD_GET_DISPLAY_INFO)[..10]), RESP_ERR_UNSPEC);
        assert_eq!(h.send(&hdr(CMD_RESOURCE_CREATE_2D)), RESP_ERR_UNSPEC);
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[0, 0, 8])), RESP_ERR_UNSPEC);
        assert_eq!(h.send(&hdr(0x0200)), RESP_ERR_UNSPEC, "3D commands are not offered");
        assert_eq!(h.send(&hdr(0xdead)), RESP_ERR_UNSPEC);
    }

    #[test]
    fn too_small_response_buffer_gets_nothing() {
        let mut h = harness();
        assert!(h.send_on(0, &hdr(CMD_GET_DISPLAY_INFO), &[], 100).is_empty());
        assert!(h.send_on(0, &req(CMD_RESOURCE_CREATE_2D, &[1, 2, 8, 8]), &[], 0).is_empty());
        assert!(h.send_on(0, &req(CMD_GET_EDID, &[0, 0]), &[], 24).is_empty());
        // The create still happened: the command ran, only its answer was lost.
        assert_eq!(h.create(1, 8, 8), RESP_ERR_INVALID_RESOURCE_ID);
    }

    #[test]
    fn edid_is_offered_and_describes_the_preferred_mode() {
        let mut h = harness();
        assert_ne!(Gpu::new(h.screen.clone(), (800, 600), None).features() & VIRTIO_GPU_F_EDID, 0);
        let r = h.send_on(0, &req(CMD_GET_EDID, &[0, 0]), &[], 2048);
        assert_eq!(r.len(), EDID_RESP_SIZE);
        assert_eq!(r[0..4], RESP_OK_EDID.to_le_bytes());
        assert_eq!(r[24..28], 128u32.to_le_bytes());
        let block = &r[32..160];
        assert_eq!(block.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(block, &edid(1024, 768)[..]);
        assert_eq!(h.send(&req(CMD_GET_EDID, &[1, 0])), RESP_ERR_INVALID_SCANOUT_ID);
    }

    #[test]
    fn display_change_raises_an_event_and_a_config_interrupt() {
        let mut h = harness();
        assert_eq!(h.config(0), 0);
        h.handle.set_display_size(1920, 1080);
        assert_eq!(h.config(0), EVENT_DISPLAY);
        assert_eq!(h.d.msis(), vec![(MSI_ADDR, CONFIG_MSI_DATA)]);
        let r = h.send_on(0, &hdr(CMD_GET_DISPLAY_INFO), &[], 512);
        assert_eq!(r[32..40], [1920u32.to_le_bytes(), 1080u32.to_le_bytes()].concat());
        h.d.write(DEVICE_CFG_OFFSET + 4, 4, u64::from(EVENT_DISPLAY));
        assert_eq!(h.config(0), 0, "events_clear clears");
        h.handle.set_display_size(10, 100_000);
        assert_eq!(h.handle.display_size(), (640, display::MAX_HEIGHT));
    }

    #[test]
    fn cursor_updates_and_moves_reach_the_sink() {
        let mut h = harness();
        assert_eq!(h.create(5, 64, 64), RESP_OK_NODATA);
        assert_eq!(h.attach(5, &[(BACKING_A, 64 * 64 * 4)]), RESP_OK_NODATA);
        h.d.mem.write_obj(0xff11_2233u32, GuestAddress(BACKING_A)).unwrap();
        assert_eq!(h.send(&transfer_req([0, 0, 64, 64], 0, 5)), RESP_OK_NODATA);
        let mut update = req(CMD_UPDATE_CURSOR, &[0, 100, 50, 0, 5, 3, 4, 0]);
        h.send_on(1, &update, &[], 0);
        let cursor = h.screen.cursors.lock().unwrap().last().cloned().flatten().unwrap();
        assert_eq!((cursor.width, cursor.height, cursor.hot_x, cursor.hot_y), (64, 64, 3, 4));
        assert_eq!(cursor.data[0..4], 0xff11_2233u32.to_le_bytes());
        h.send_on(1, &req(CMD_MOVE_CURSOR, &[0, 200, 300, 0, 0, 0, 0, 0]), &[], 0);
        assert_eq!(h.screen.moves.lock().unwrap().as_slice(), &[(103, 54), (203, 304)]);
        update[40..44].copy_from_slice(&0u32.to_le_bytes());
        h.send_on(1, &update, &[], 0);
        assert_eq!(h.screen.cursors.lock().unwrap().last(), Some(&None), "resource 0 hides");
    }

    #[test]
    fn disabling_unref_and_reset_turn_the_scanout_off() {
        let mut h = harness();
        shown_resource(&mut h, [0, 0, 64, 32]);
        assert_eq!(h.send(&req(CMD_RESOURCE_UNREF, &[1, 0])), RESP_OK_NODATA);
        assert_eq!(h.screen.modes.lock().unwrap().last(), Some(&(SourceId::Gpu(0), None)));
        shown_resource(&mut h, [0, 0, 64, 32]);
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[0, 0, 0, 0, 0, 0])), RESP_OK_NODATA);
        assert_eq!(h.screen.modes.lock().unwrap().last(), Some(&(SourceId::Gpu(0), None)));
        assert_eq!(h.send(&req(CMD_SET_SCANOUT, &[0, 0, 64, 32, 0, 1])), RESP_OK_NODATA);
        h.d.write(0x14, 1, 0);
        assert_eq!(h.screen.modes.lock().unwrap().last(), Some(&(SourceId::Gpu(0), None)));
        assert_eq!(h.screen.modes.lock().unwrap().len(), 6);
    }

    #[test]
    fn framebuffer_bar_makes_a_vga_function_with_registers_in_bar_2() {
        let screen = Arc::new(RecordingScreen::default());
        let plain = Gpu::new(screen.clone(), (1024, 768), None);
        let mut d = TestDriver::new(Box::new(plain));
        assert_eq!(d.dev.read_config_register(2) >> 8, 0x03_80_00);
        let fb = Arc::new(Mutex::new(BootFramebuffer::new(16 << 20).unwrap()));
        let vga = Gpu::new(screen, (1024, 768), boot_fb::host_memory(&fb));
        let mut d = TestDriver::new(Box::new(vga));
        assert_eq!(d.dev.read_config_register(2) >> 8, 0x03_00_00);
        assert_eq!(d.dev.read_config_register(4), 0x0000_0008, "32-bit prefetchable");
        let bars = d.dev.bars();
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].size, 16 << 20);
        assert_eq!(
            bars[0].ram.as_ref().map(|m| m.host_addr()),
            Some(fb.lock().unwrap().host_addr() as usize)
        );
        assert_eq!(bars[1].index, 2);
        // Every virtio capability names BAR 2.
        let mut ptr = d.dev.read_config_register(13) as usize & 0xff;
        while ptr != 0 {
            let dword = d.dev.read_config_register(ptr / 4);
            if dword as u8 == 0x09 {
                assert_eq!(d.dev.read_config_register(ptr / 4 + 1) as u8, 2);
            } else if dword as u8 == 0x11 {
                assert_eq!(d.dev.read_config_register(ptr / 4 + 1) & 7, 2);
            }
            ptr = (dword >> 8) as usize & 0xff;
        }
        let mut fb = [0xaau8; 4];
        d.dev.bar_read(0, 0, &mut fb);
        assert_eq!(fb, [0; 4]);
        d.bring_up_queues(&[&TestQueue::new(16, 0x18_0000)]);
        let r = d.read(0x12, 2);
        assert_eq!(r, 2, "registers work through BAR 2");
    }

    fn fresh_gpu(h: &Harness) -> (crate::virtio::VirtioPciDevice, Arc<RecordingScreen>) {
        let screen = Arc::new(RecordingScreen::default());
        let gpu = Gpu::new(screen.clone(), (1024, 768), None);
        let dev =
            crate::virtio::VirtioPciDevice::new(Box::new(gpu), h.d.mem.clone(), h.d.sink.clone())
                .unwrap();
        (dev, screen)
    }

    #[test]
    fn restored_gpu_shows_the_saved_scanout_and_cursor_and_keeps_working() {
        use crate::pci::PciDevice;
        let mut h = harness();
        shown_resource(&mut h, [0, 0, 64, 32]);
        let cursor = req(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 1, 3, 4, 0]);
        h.send_on(1, &cursor, &[], 64);
        h.handle.set_display_size(1280, 800);
        let saved = h.d.dev.save_state().unwrap();

        let (mut fresh, screen) = fresh_gpu(&h);
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        assert_eq!(screen.pixel(5, 3), Some(3 << 16 | 5), "the screen shows the saved image");
        assert!(screen.cursors.lock().unwrap().last().unwrap().is_some(), "cursor shown");
        assert_eq!(screen.moves.lock().unwrap().last(), Some(&(13, 24)));
        h.d.dev = fresh;
        h.screen = screen;
        assert_eq!(h.config(0), EVENT_DISPLAY, "the display event is still pending");
        // The backing survived: a new transfer and flush reach the new screen.
        h.d.mem.write_obj(0xabcdu32, GuestAddress(BACKING_A)).unwrap();
        assert_eq!(h.send(&transfer_req([0, 0, 64, 32], 0, 1)), RESP_OK_NODATA);
        assert_eq!(h.send(&req(CMD_RESOURCE_FLUSH, &[0, 0, 64, 32, 1, 0])), RESP_OK_NODATA);
        assert_eq!(h.screen.pixel(0, 0), Some(0xabcd));
    }

    #[test]
    fn hostile_gpu_state_is_refused_and_the_device_is_unchanged() {
        use crate::pci::PciDevice;
        use crate::virtio::pci_transport::VirtioPciState;
        let mut h = harness();
        shown_resource(&mut h, [0, 0, 64, 32]);
        let transport: VirtioPciState = state::decode("t", &h.d.dev.save_state().unwrap()).unwrap();
        let good: GpuState = state::decode("g", &transport.device).unwrap();
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.resources[0].width = u32::MAX;
        cases.push((s, "has an absurd size"));
        let mut s = good.clone();
        s.resources[0].data.pop();
        cases.push((s, "pixels do not fit its size"));
        let mut s = good.clone();
        s.resources[0].backing[0].0 = 0xffff_0000_0000;
        cases.push((s, "backing is outside guest memory"));
        let mut s = good.clone();
        s.scanout_rect = [0, 0, 65, 32];
        cases.push((s, "Scanout shows a missing resource or lies outside it"));
        let (mut fresh, _) = fresh_gpu(&h);
        let before = fresh.save_state().unwrap();
        for (i, (case, names)) in cases.into_iter().enumerate() {
            let t =
                VirtioPciState { device: state::encode("g", &case).unwrap(), ..transport.clone() };
            let r = fresh.restore_state(&state::encode("t", &t).unwrap());
            assert!(matches!(r, Err(StateError::Invalid { .. })), "case {i}: {r:?}");
            let message = r.unwrap_err().to_string();
            assert!(message.contains(names), "case {i} does not say {names:?}: {message}");
            assert_eq!(fresh.save_state().unwrap(), before, "case {i} changed the device");
        }
    }
}
