"""Shared-memory IPC between the VMM and device processes.

No KVM here: the region registry (:mod:`ipc.registry`), the access slots
(:mod:`ipc.slots`), the control protocol (:mod:`ipc.protocol`, no I/O) and
its socket transport (:mod:`ipc.transport`).  Neither :mod:`vmm` nor :mod:`devserver` is
imported from this package.
"""

from typing import TYPE_CHECKING

from devices.lazy import lazy_exports

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

if TYPE_CHECKING:
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

# Imported from their modules when first asked for: the VMM's own set-up
# needs the registry, a device process the protocol and the transport too;
# a run with no device process never imports those (start-up, issue 15).
_MODULE_OF = {
    "IpcError": "errors", "ProtocolError": "protocol", "LocalProtocolError": "protocol",
    "RemoteProtocolError": "protocol", "Channel": "transport",
    **dict.fromkeys(("SlotCaller", "SlotError", "SlotServer"), "slots"),
    **dict.fromkeys(("Bus", "LayoutError", "LockTimeout", "LockUnusable", "Reference", "RegionConflict",
                     "RegionNotFound", "RegionRecord", "Registry", "RegistryError", "RegistryFull",
                     "StaleReference", "pci_address"), "registry"),
}


__getattr__, __dir__ = lazy_exports(globals(), _MODULE_OF)
