"""The registry as a device host sees it, shared by both hosts (the remote
one in :mod:`devserver.host` and the inline one in :mod:`vmm.local`):
registry errors turned into the model's refusals, and the regions a
restarted model takes over (:meth:`DeviceHost.adopt`) or leaves behind.

This module imports only :mod:`devices` and :mod:`ipc`, so the VMM may
import it without the device runtime."""

from __future__ import annotations

from devices.base import DeviceHost, HostRefused, RegionBusy, RegionNotHeld, RegionTableFull, Space
from ipc import Bus, RegionConflict, RegionNotFound, Registry, RegistryError, RegistryFull

_SPACE_OF = {Bus(int(s)): s for s in Space}


def registry_refusal(e: RegistryError | ValueError) -> HostRefused:
    """The model's view of a registry error."""
    if isinstance(e, RegionConflict):
        return RegionBusy(str(e))
    if isinstance(e, RegistryFull):
        return RegionTableFull(str(e))
    if isinstance(e, RegionNotFound):
        return RegionNotHeld(str(e))
    return HostRefused(f"the registry refused: {e}")


class RegistryHost(DeviceHost):
    """What both hosts do alike with the registry: ``registry``, ``owner``,
    the ``taken`` regions (claimed or adopted here) and the ``coalesced``
    ones.  Subclasses implement :meth:`claim` (which adds to ``taken``)."""

    registry: Registry
    owner: int
    taken: set[tuple[Space, int]]
    coalesced: dict[tuple[Space, int], int]

    def adopt(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        """Claim, or find this owner's identical region already there
        (left by the device's previous process; devices.base)."""
        try:
            self.claim(space, start, length, cookie, coalesce=coalesce)
            return
        except RegionBusy:
            bus = Bus(int(space))
            try:
                held = any(r.bus == bus and r.start == start and r.length == length and r.owner == self.owner
                           and r.cookie == cookie and not r.removing for r in self.registry.regions())
            except RegistryError as e:
                raise registry_refusal(e) from None
            if not held:
                raise
        if coalesce:
            self.coalesced[(Space(space), start)] = length
        self.taken.add((Space(space), start))

    def release_unadopted(self) -> int:
        """Unregister this owner's regions no claim/adopt here took."""
        try:
            stale = [r for r in self.registry.regions() if r.owner == self.owner and not r.removing
                     and r.bus in _SPACE_OF and (_SPACE_OF[r.bus], r.start) not in self.taken]
            for r in stale:
                self.registry.unregister(r.bus, r.start, self.owner)
        except (RegistryError, ValueError) as e:
            raise registry_refusal(e) from None
        return len(stale)
