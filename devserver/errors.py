"""The errors of the device-process runtime (one base, :class:`DevserverError`).

What a *model* sees of its host's refusals are the
:class:`devices.base.HostRefused` family; these are the runtime's own.
"""

from __future__ import annotations


class DevserverError(Exception):
    """Base of the errors of :mod:`devserver`."""


class StartFailed(DevserverError):
    """The device cannot start; the message goes to the VMM as Error."""
