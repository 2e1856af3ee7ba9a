//! PCI: host bridge and configuration space. (being written)
