"""The device host of a separate device process (``process=isolated``).

:class:`RemoteHost` implements :class:`devices.base.DeviceHost` over the
shared registry: a model claims and releases its regions there directly,
under the owner id the VMM gave this process, with no round trip to the
VMM, also from inside the handler of an access (a window that moves).
"""

from __future__ import annotations

import os

from devices.base import Space
from ipc import Bus, Registry


class RemoteHost:
    """What a model running in a device process may ask of its host."""

    def __init__(self, registry: Registry, owner: int):
        self.registry = registry
        self.owner = owner
        self._pid = os.getpid()

    def claim(self, space: Space, start: int, length: int, cookie: int = 0) -> None:
        self.registry.register(Bus(int(space)), start, length, self.owner, cookie)

    def release(self, space: Space, start: int) -> None:
        self.registry.unregister(Bus(int(space)), start, self.owner)

    def process_id(self) -> int:
        return self._pid
