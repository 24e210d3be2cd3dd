"""The base of every error the :mod:`ipc` package raises.

Each part keeps its own family under it (:class:`ipc.RegistryError`,
:class:`ipc.SlotError`, :class:`ipc.ProtocolError`), so a caller may catch
one family, or everything that shared memory and the control protocol can
raise with ``except IpcError``.  Bad arguments are still ``ValueError``.
"""


class IpcError(Exception):
    """Base of the errors of the ipc package."""
