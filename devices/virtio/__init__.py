"""virtio 1.x devices on the PCI transport: :mod:`devices.virtio.pci`
(transport), :mod:`devices.virtio.virtqueue` (split rings in guest RAM),
:mod:`devices.virtio.rng`."""
