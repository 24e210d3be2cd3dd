"""virtio 1.x devices on the PCI transport: :mod:`devices.virtio.spec` (the
specification's numbers), :mod:`devices.virtio.core` (status, features,
the queue loop), :mod:`devices.virtio.doorbells` (the ioeventfd thread),
:mod:`devices.virtio.pci` (the transport), :mod:`devices.virtio.virtqueue`
(split rings in guest RAM); the models :mod:`devices.virtio.rng`,
:mod:`devices.virtio.blk`, :mod:`devices.virtio.console`."""
