"""The device-process runtime: attach to the VMM over a control socket, map
the shared segments, run one device model, serve its accesses from the
access slots, and let it claim and release its own regions in the shared
registry.  Imports :mod:`ipc` and :mod:`devices`, never :mod:`vmm`.
"""

from devserver.errors import DevserverError, StartFailed

__all__ = ["DevserverError", "StartFailed"]
