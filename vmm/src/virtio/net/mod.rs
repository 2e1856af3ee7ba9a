//! virtio-net (virtio 1.2 section 5.1): one RX/TX queue pair over a [`net::NetBackend`],
//! without offloads (libslirp verifies every checksum), with MAC, link status, MTU and
//! mergeable receive buffers.
//!
//! ```text
//!  TX notify (vCPU or I/O thread) ─▶ drain txq ─▶ strip virtio_net_hdr ─▶ NetBackend::send
//!  RxNotify (backend, any thread) ─┐
//!  RX notify (buffers added)      ─┴▶ wake the RX thread (virtio::worker)
//!  RX thread ─▶ NetBackend::recv ─▶ pending frame ─▶ header + frame into rxq buffers ─▶ irq
//!  LinkHandle::set_link_up ─▶ config status ─▶ config-change interrupt
//! ```

mod device;
mod persist;

pub use device::{LinkHandle, NetConfig, NetStats, VirtioNet};
pub use persist::NetState;

/// Feature bits (virtio 1.2 section 5.1.3).
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// The `status` bit of the configuration space.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The `virtio_net_hdr_v1` before every frame in both directions (VERSION_1 always has
/// `num_buffers`).
pub const NET_HDR_LEN: usize = 12;

/// The MTU range libslirp (and the spec's `mtu` field) allows, and the Ethernet default.
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 65521;
pub const DEFAULT_MTU: u16 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum VirtioNetError {
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u16),
    #[error("MAC address {0:02x?} is a multicast address")]
    MulticastMac([u8; 6]),
    #[error("Could not start the network receive thread")]
    Worker(#[from] crate::virtio::worker::WorkerError),
}
