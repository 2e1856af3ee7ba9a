//! Virtio devices and the virtio-pci transport. (being written)
