"""Shared-memory IPC between the VMM and device processes.

No KVM here: the region registry (:mod:`ipc.registry`) and, later, access
slots and the control protocol.  Neither :mod:`vmm` nor :mod:`devserver` is
imported from this package.
"""

from ipc.registry import (
    Bus,
    LayoutError,
    LockTimeout,
    LockUnusable,
    Reference,
    RegionConflict,
    RegionNotFound,
    RegionRecord,
    Registry,
    RegistryError,
    RegistryFull,
    StaleReference,
    pci_address,
)

__all__ = [
    "Bus",
    "LayoutError",
    "LockTimeout",
    "LockUnusable",
    "Reference",
    "RegionConflict",
    "RegionNotFound",
    "RegionRecord",
    "Registry",
    "RegistryError",
    "RegistryFull",
    "StaleReference",
    "pci_address",
]
