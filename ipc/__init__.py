"""Shared-memory IPC between the VMM and device processes.

No KVM here: the region registry (:mod:`ipc.registry`), the access slots
(:mod:`ipc.slots`), the control protocol (:mod:`ipc.protocol`, no I/O) and
its socket transport (:mod:`ipc.transport`).  Neither :mod:`vmm` nor :mod:`devserver` is
imported from this package.
"""

from ipc.errors import IpcError
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
from ipc.slots import (
    SlotCaller,
    SlotError,
    SlotServer,
)
from ipc.protocol import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from ipc.transport import Channel

__all__ = [
    "IpcError",
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
    "SlotCaller",
    "SlotError",
    "SlotServer",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Channel",
]
