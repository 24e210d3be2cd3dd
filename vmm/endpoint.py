"""What the dispatcher forwards an access to: one interface for a device
model running inside the VMM and for one running in a device process.

As in crosvm's ProxyDevice, the dispatcher cannot tell the two apart; unlike
it, a failed round trip is never a quiet zero: the endpoint raises
:class:`DeviceFailed` and the dispatcher completes the access the way an
empty bus would (reads all ones, writes dropped), then marks the device
failed and reaps its regions.
"""

from __future__ import annotations

from typing import Protocol

#: Registry owner id of regions the VMM itself serves (test-exit port,
#: PCI host bridge, ...).  Devices get ids from FIRST_DEVICE_OWNER up.
VMM_OWNER = 1
FIRST_DEVICE_OWNER = 2


class VmmError(Exception):
    """Base of the errors the vmm package raises."""


class ConfigError(VmmError):
    """A bad command-line argument or device spec (exit status 2).  Also
    :class:`vmm.config.ConfigError`; defined here so that a run that
    parses no device spec need not import :mod:`vmm.config` (issue 15)."""


class DeviceFailed(VmmError):
    """The device did not answer (dead, timed out, or broke the protocol)."""


class Endpoint(Protocol):
    """One device as the dispatcher sees it."""

    #: The registry owner id of the device's regions.
    owner: int
    #: The device's ``id=`` (for logs and the end-of-run summary).
    name: str

    def access(self, vcpu: int, space: int, cookie: int, offset: int, size: int,
               is_write: bool, value: int) -> int:
        """Serve one access from vCPU ``vcpu``; returns the value read (0
        for a write).  Raises :class:`DeviceFailed`."""

    def access_batch(self, vcpu: int, writes: list[tuple[int, int, int, int, int]]) -> None:
        """Serve writes ``(space, cookie, offset, size, value)`` in order
        (coalesced MMIO, drained from KVM's ring), as one request where the
        placement allows it.  Raises :class:`DeviceFailed`."""

    def close(self) -> None:
        """Stop the device and release what it holds."""
